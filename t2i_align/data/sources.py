"""Batch sources for the training loop: offline pair data (optionally cached), sharded across processes.

The order is ours, not the DataLoader's, and a function of (seed, epoch, rank) only, so a resumed run skips
exactly the micro-batches already consumed and sees the same batches as an uninterrupted one, on any number of
processes. Uncached pairs stream (`stream.StreamingPairSource`: row groups in a seeded order, shuffled within
a window; reads each row group about once per epoch). Cached pairs are memory-mapped rows, cheap to read in any
order: `OfflineSource` takes the permutation seeded by (seed, e) and process r every world-th index of it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..config import ConfigError
from ..engines import say
from .cache import build_or_load_cache, collate_cached
from .cache_build import Team
from .cache_key import components_key_parts
from .images import open_parquet
from .images import find_parquet_files
from .pairs import check_pair_columns, load_pairs, model_columns
from .stream import StreamingPairSource
from ..users.training import count_known, known_rows, load_training_table


class OfflineSource:
    """`rows`: the dataset's rows to serve (None: all; PPD leaves out users missing from its table)."""

    def __init__(self, dataset, collate: Callable, batch_size: int, seed: int, rank: int, world: int,
                 num_workers: int = 0, rows: Optional[List[int]] = None):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_workers = num_workers
        self.rows = list(range(len(dataset))) if rows is None else list(rows)
        self.data_rows = len(self.rows)  # what the order is drawn from: a resume checks it is unchanged
        self.per_rank = len(self.rows) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(self.rows)} usable pairs are too few for batch_size={batch_size} on {world} "
                             "process(es); lower train.batch_size or add data")

    def _epoch_indices(self, epoch: int) -> List[int]:
        perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return [self.rows[i] for i in perm[self.rank::self.world][: self.batches_per_epoch * self.batch_size]]

    def micro_batches(self, start: int = 0) -> Iterator[Optional[Dict]]:
        """Micro-batches forever, beginning after the first `start` ones (None: all of a batch's rows corrupt)."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            self.dataset.set_epoch(epoch)
            indices = self._epoch_indices(epoch)[skip * self.batch_size:]
            # Own generator: creating a loader iterator must not draw from the global RNG (noise, timesteps),
            # or a resumed run would see different noise than an uninterrupted one.
            loader = DataLoader(Subset(self.dataset, indices), batch_size=self.batch_size, shuffle=False,
                                collate_fn=self.collate, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, skip = epoch + 1, 0

    def sample_captions(self, n: int) -> List[str]:
        """The first n distinct non-empty captions (validation prompts when none are configured)."""
        return first_captions(self.dataset, n)

    def metrics(self) -> Dict[str, float]:
        """Source figures for the logs (online sources report their rounds; offline data has none)."""
        return {}


def first_captions(dataset, n: int) -> List[str]:
    seen: List[str] = []
    uncached = hasattr(dataset, "caption")  # a cache stores each distinct caption once, in `captions`
    for caption in (dataset.caption(i) for i in range(len(dataset))) if uncached else dataset.captions:
        if caption and caption not in seen:
            seen.append(caption)
        if len(seen) == n:
            break
    return seen


def _cache_encoders(components, device):
    from ..batches import encode_images
    from ..conditioning.text import encode_prompts

    def images(pixels):
        return encode_images(components, pixels.to(device))

    def prompts(captions):
        embeds = encode_prompts(components, captions)
        return {"prompt_embeds": embeds.prompt_embeds, "pooled_prompt_embeds": embeds.pooled_prompt_embeds}

    return images, prompts


def same_rows_everywhere(accelerator, dataset) -> None:
    """Uncached data read by several processes: all stop unless each holds the same rows (a machine with a partial
    copy would share out its own rows, some trained twice, some never), as a cache build checks (cache.py)."""
    if accelerator.num_processes > 1:
        from .cache import check_same_rows, rows_digest

        check_same_rows(rows_digest(dataset), _team(accelerator))


def _team(accelerator) -> Team:
    """The run's processes, to split a cache build (cache_build.py)."""
    if accelerator.num_processes == 1:
        return Team()
    from accelerate.utils import broadcast_object_list, gather_object

    return Team(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                lambda value: broadcast_object_list([value])[0], lambda value: gather_object([value]))


def encoding_settings(components) -> Dict[str, Any]:
    """How text (and, later, images) are encoded beyond what the loaded weights show: the `encoding` part of the
    cache key. Today the text-encoding choice (`text_encoding_key`: {} for clip77, kind and token budget for
    segments); a future encoding option belongs here too."""
    from ..conditioning.text import text_encoding_key

    return text_encoding_key(components.text_encoding)


DATA_KINDS_FOR = {"pairs": ("pairs",), "images": ("pairs", "captions"), "prompts": ("prompts",)}
"""Objective batch kind -> the data.kind values that can feed it (SFT reads a pair's preferred image)."""


def check_data_kind(cfg, batch_kind: str) -> None:
    """ConfigError when data.kind (or RAFT) cannot feed an objective's batches, saying what to set."""
    name = cfg.objective.name
    if cfg.raft.enabled:
        if batch_kind == "prompts":
            raise ConfigError(f"objective {name} trains on prompts and generates its own images; RAFT's online "
                              "samples cannot feed it: set raft.enabled=false and data.kind=prompts")
        return
    if cfg.data.kind not in DATA_KINDS_FOR[batch_kind]:
        raise ConfigError(f"objective {name} trains on {batch_kind} batches, which data.kind={cfg.data.kind} "
                          f"cannot give: set data.kind to {' or '.join(DATA_KINDS_FOR[batch_kind])} (and data.path "
                          "to such data)")


def check_data_files(cfg) -> None:
    """The data a run reads is there, checked before the model loads: pair parquet files (with the model_0 /
    model_1 columns data.both_models_contain filters on, and PPD's user_id), image-caption files, a prompts file."""
    kind = "raft" if cfg.raft.enabled else cfg.data.kind
    if cfg.data.both_models_contain and kind != "pairs":
        raise ConfigError(f"data.both_models_contain = {cfg.data.both_models_contain!r} filters pair data, but this "
                          "run reads none (RAFT, or data.kind captions/prompts); leave it empty")
    if kind == "prompts":
        from .prompts_source import read_prompt_data

        read_prompt_data(cfg.data)
    elif kind == "captions":
        from .captions import caption_files

        caption_files(cfg.data, check_columns=True)
    elif kind == "pairs":
        _check_pair_files(cfg)
    if cfg.data.cache and kind in ("pairs", "captions"):
        _check_cache_root(cfg)


def cache_root(cfg) -> Path:
    """The folder caches live in: data.cache_dir, by default <output_dir>/../cache."""
    return Path(cfg.data.cache_dir or Path(cfg.output_dir).parent / "cache")


def _check_cache_root(cfg) -> None:
    """The cache folder is a folder or can be made: a file there failed after the model had loaded, as "File
    exists: PATH", naming no setting."""
    root = cache_root(cfg)
    found = next((p for p in (root, *root.parents) if p.exists()), None)
    if found is not None and not found.is_dir():
        setting = "data.cache_dir" if cfg.data.cache_dir else "the cache folder <output_dir>/../cache"
        raise ConfigError(f"{setting} = {root}: {found} is a file, not a folder; set data.cache_dir to a folder "
                          "(made if missing)")


def _check_pair_files(cfg) -> None:
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to a Pick-a-Pic-format parquet file or folder (your own "
                          "image pairs: python -m t2i_align.data pairs --from LISTING --out DIR; for the toy world: "
                          "python -m t2i_align.toy pairs --out DIR)")
    files = find_parquet_files(cfg.data.path)
    for path in files:  # footers only: image-caption data given to a pairs method stopped only at the run's start
        schema = open_parquet(path).schema_arrow
        names = schema.names
        check_pair_columns(schema, path)
        model_columns(cfg.data.both_models_contain, names, path)
        if cfg.ppd.enabled and "user_id" not in names:  # found after a whole cache build otherwise
            raise ConfigError(f"ppd.enabled but {path} has no user_id column: PPD needs each pair's user (Pick-a-Pic's "
                              "user_id); rebuild the data with one, or set ppd.enabled=false")


def check_pair_rows(cfg) -> str:
    """The dry run's count of usable pairs, from the label, caption and model columns (no image decoded): none, or
    fewer than one process's batch, fail as the run would after its model loaded (several processes need a batch
    each: the launcher's count is checked when the run starts). With PPD, only pairs of the table's users count.
    Returns the count's summary."""
    if cfg.raft.enabled or cfg.data.kind != "pairs":
        return ""
    dataset = load_pairs(cfg.data, cfg.seed)
    usable, whose = len(dataset), ""
    if cfg.ppd.enabled:  # no pair of the table's users (7 vs "7") failed only after the model and the cache
        table = load_training_table(cfg.ppd.table, cfg.ppd.layers)
        usable, whose = count_known(dataset.user_ids, table, "the training data")[0], " of the user table's users"
    if usable < cfg.train.batch_size:
        raise ConfigError(f"{usable} usable pairs{whose} in {cfg.data.path} are too few for train.batch_size="
                          f"{cfg.train.batch_size} on one process ({dataset.stats.summary()}); lower it or add data")
    tried = range(min(len(dataset), 8))  # a few, not every image: a note, the run decides
    if all(dataset.decode(i) is None for i in tried):  # the run stopped after an epoch: only then was it said
        return (f"data {cfg.data.path}: {dataset.stats.summary()}; note: none of the first {len(tried)} pairs' images "
                "decode (see the warnings above): the run skips such pairs and stops after an epoch if none "
                "decodes; check that jpg_0 / jpg_1 hold image files' bytes")
    return f"data {cfg.data.path}: {dataset.stats.summary()} (images are decoded when the run reads them)"


def build_data_source(cfg, components, accelerator, batch_kind: str = "pairs", users=None):
    """Online RAFT batches when cfg.raft.enabled; else pairs from cfg.data: streamed when uncached, or cached
    (built by all processes together). `users` (PPD's user table): pairs of users it lacks are left out, before
    the rows are shared out (a cache holds every row: its key does not depend on the table)."""
    check_data_kind(cfg, batch_kind)
    if cfg.raft.enabled:
        from .online import OnlineSource

        return OnlineSource(cfg, components, accelerator, batch_kind)
    if cfg.data.kind == "prompts":
        from .prompts_source import build_prompt_source

        return build_prompt_source(cfg, accelerator)
    if cfg.data.kind == "captions":
        from .captions import build_caption_source

        return build_caption_source(cfg, components, accelerator)
    check_data_files(cfg)
    dataset = load_pairs(cfg.data, cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    tell = functools.partial(say, accelerator)  # PPD's count of left-out pairs, from the main process
    if not cfg.data.cache:
        if users is not None:
            keep = set(known_rows(dataset.user_ids, users, "the training data", tell))
            dataset.drop([i for i in range(len(dataset)) if i not in keep])
        report_rows(accelerator, cfg.data.path, dataset.stats, cached=False)
        same_rows_everywhere(accelerator, dataset)
        return StreamingPairSource(dataset, cfg.train.batch_size, cfg.seed, rank, world, cfg.data.num_workers,
                                   window=cfg.data.shuffle_window)
    cached = cached_data(cfg, components, accelerator, dataset)
    report_rows(accelerator, cfg.data.path, cached.stats, cached=True)
    rows = None if users is None else known_rows(cached.user_ids, users, "the training data", tell)
    return OfflineSource(cached, collate_cached, cfg.train.batch_size, cfg.seed, rank, world, cfg.data.num_workers,
                         rows=rows)


def report_rows(accelerator, path, stats, cached: bool) -> None:
    """Say at start what the data held and what was skipped (ties, labels, captions; with a cache, undecodable
    images too, found when it was built); without a cache, undecodable images are met and counted in training
    (data_rows_skipped in metrics.jsonl)."""
    later = "" if cached else "; undecodable images are skipped as training meets them (data_rows_skipped)"
    say(accelerator, f"data {path}{' (cached)' if cached else ''}: {stats.summary()}{later}")


def note_frozen_augmentation(accelerator, data) -> None:
    """A cache holds one crop and flip per image, drawn when it was built: say so when the settings ask for random
    ones (a config asking for random flips with a cache got one fixed draw without a word)."""
    random = [f"data.{k}={v}" for k, v in (("flip", data.flip), ("crop", data.crop)) if v not in ("none", "center")]
    if random:
        say(accelerator, f"note: with data.cache=true, {' and '.join(random)} are drawn once, when the cache was "
                         "built, and stay fixed over epochs; data.cache=false draws them afresh every epoch")


def cached_data(cfg, components, accelerator, dataset):
    """`dataset` (pairs or image-caption rows) as latents and embeddings, from the cache in data.cache_dir, which
    the run's processes build together if it is not there yet."""
    root = cache_root(cfg)
    key = components_key_parts(cfg.model, components, encoding_settings(components))
    enc_images, enc_prompts = _cache_encoders(components, accelerator.device)
    cached = build_or_load_cache(dataset, enc_images, enc_prompts, root, key, team=_team(accelerator))
    cached.prompt_dropout = cfg.data.prompt_dropout
    note_frozen_augmentation(accelerator, cfg.data)
    return cached
