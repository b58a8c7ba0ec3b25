"""Pick-a-Pic-v2-format preference pairs from local parquet files (real Pick-a-Pic or `t2i_align.toy pairs`).

Labels and captions are read up front (small). Image bytes are read two ways: `dataset[i]` reads row i's row
group (the last one is kept, so a sequential pass such as cache building reads each row group once), and
`item_from_raw` prepares an item from bytes a streaming reader already holds (`stream.py`: the shuffled
uncached training path, which reads each row group about once per epoch instead of once per item).

Ties (label_0 == 0.5) are dropped by default, as the official Diffusion-DPO code does; the diffusers examples
silently keep them with jpg_0 as the winner ("first"). label_0 == 0 swaps the pair so the winner comes first.
A label_0 that is not a number in [0, 1] (NaN, inf, 3.0, -1) is no preference: the row is skipped and counted
in `invalid_labels`, as rows with has_label == False are in `unlabelled`.

Every random choice of an item (prompt dropout, flips, random crops) comes from a generator seeded by
(seed, epoch, row id), so data and augmentations are reproducible and resume-safe whatever the worker count.
With DataLoader workers, call `set_epoch` before creating the epoch's iterator (no persistent_workers).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..config import ConfigError
from .images import (DECODE_ERRORS, PIXEL_READING, as_text, decode_rgb, find_parquet_files, open_parquet,
                     prepare_image, read_group, read_row_group)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
_MAX_WARNINGS = 5


@dataclass
class PairStats:
    """Row counts: `rows` read (reading stops once max_pairs usable pairs are found), `used` pairs."""

    rows: int = 0
    used: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    unlabelled: int = 0
    invalid_labels: int = 0
    corrupt: int = 0
    no_caption: int = 0  # caption missing (None) or not text: skipped, not trained on unconditionally
    empty_caption: int = 0  # "" (or blank): used, as an unconditional pair, and counted so that it is seen
    other_models: int = 0  # skipped by data.both_models_contain (a generator filter)
    same_image: int = 0  # are_different false (Pick-a-Pic's flag): one image twice, nothing to prefer

    def summary(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')}={v}" for k, v in asdict(self).items())

    def skipping(self, corrupt: int) -> "PairStats":
        """A copy with `corrupt` more rows found undecodable (at caching time) and as many fewer used."""
        return replace(self, corrupt=self.corrupt + corrupt, used=self.used - corrupt)


def files_identity(files: Sequence[Path]) -> List[list]:
    """[path, size, mtime] of each data file: part of a cache key (a rewritten file is new data)."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def model_columns(part: str, names: Sequence[str], path: Path) -> List[str]:
    """model_0 and model_1 (the generators of jpg_0 / jpg_1) when data.both_models_contain (`part`) filters on
    them; none when it is empty."""
    if not part:
        return []
    if not {"model_0", "model_1"} <= set(names):
        raise ConfigError(f"data.both_models_contain = {part!r} filters on the columns model_0 and model_1 "
                          f"(Pick-a-Pic's generators), which {path} lacks (found {list(names)}); leave "
                          "data.both_models_contain empty for this data")
    return ["model_0", "model_1"]


def text_column(table, name: str) -> List[Any]:
    """A string column's values, None for one that is not UTF-8 (a tool that does not check) instead of failing the
    column; a binary column (text some tools write as bytes) decoded so too: its captions were all "no caption"."""
    column = table.column(name)
    if _is_bytes(_values(column.type)):
        return [as_text(raw) for raw in column.to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [as_text(raw) for raw in column.cast(pa.binary()).to_pylist()]


def _values(kind: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column's value type (its rows read as those values)."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _is_bytes(kind: pa.DataType) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda _: False)(kind)  # pyarrow >= 16
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or view)


def check_pair_columns(schema: pa.Schema, path: Path) -> None:
    """The Pick-a-Pic columns, of usable types: image bytes (binary, or a datasets Image struct holding them)
    and numeric labels. Text paths or labels passed every check and made every row unusable after the model
    loaded (an epoch skipped per process, or a cache build failing)."""
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {missing}: expected Pick-a-Pic columns {list(REQUIRED_COLUMNS)}"
                         f" (label_1 etc. optional), found {list(names)}")
    for name in ("jpg_0", "jpg_1"):
        kind = _values(schema.field(name).type)
        if not (_is_bytes(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise ConfigError(f"{path}: column {name} holds {kind}, not image bytes (file paths?): build the pairs "
                              "from a listing with `python -m t2i_align.data pairs --from LISTING --out DIR`, which "
                              "reads the images into the file")
    kind = _values(schema.field("label_0").type)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_null(kind)):
        raise ConfigError(f"{path}: column label_0 holds {kind}, not numbers (P(jpg_0 preferred) in [0, 1]): "
                          "write it as a float column")


def label_problem(label: Any, has_label: Any) -> Optional[str]:
    """Why a row carries no usable preference ("unlabelled" / "invalid_labels"), or None if label_0 is usable.

    label_0 is P(image 0 preferred): anything outside [0, 1] (3.0, -1, inf) is as meaningless as NaN, and
    taking 3.0 as "image 0 wins" would train on a corrupt row. Any falsy has_label (False, 0, 0.0: a pandas round
    trip turns a bool column with nulls into floats or objects) is unlabelled; None (a null, or no has_label
    column) and NaN say nothing, so label_0 alone decides."""
    if (has_label is not None and not has_label) or label is None:
        return "unlabelled"
    if not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
        return "invalid_labels"  # NaN fails both comparisons, so it lands here too
    return None


def _decide(label: Any, has_label: Any, ties: str, stats: PairStats) -> Optional[bool]:
    """None: drop the row; else whether to swap so the winner is first."""
    problem = label_problem(label, has_label)
    if problem is not None:
        setattr(stats, problem, getattr(stats, problem) + 1)
        return None
    if label == 0.5:
        if ties == "drop":
            stats.ties_dropped += 1
            return None
        stats.ties_kept += 1
        return False
    return label < 0.5


def item_draws(seed: int, epoch: int, row_id: int) -> np.ndarray:
    """7 uniforms: [dropout, flip_w, flip_l, crop_y_w, crop_x_w, crop_y_l, crop_x_l]. Always all seven, so
    changing one setting (e.g. turning flips on) does not change the other draws."""
    return np.random.default_rng([seed % 2**63, epoch, row_id]).random(7)


def dropout_captions(caption: str, dropped: bool) -> Dict[str, str]:
    """An item's `caption` ("" where data.prompt_dropout blanked it: an unconditional row) and `dropped_caption`
    (the caption so blanked, else ""): SePPO samples its reference image for the row's real caption."""
    return {"caption": "" if dropped else caption, "dropped_caption": caption if dropped else ""}


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs; item = dict(pixels_w, pixels_l, caption, dropped_caption, original_size_w/l,
    crop_top_left_w/l, index),
    or None for a row whose image bytes do not decode (`collate_pairs` drops and counts it)."""

    SIDES = ("_w", "_l")
    """The images of an item: pixels_w / pixels_l (and their sizes and crops), cached as latents_w / latents_l."""

    def __init__(self, path: str | Path, resolution: int = 512, crop: str = "center", flip: str = "none",
                 ties: str = "drop", prompt_dropout: float = 0.0, max_pairs: int = 0, seed: int = 0,
                 root: Optional[str | Path] = None, both_models_contain: str = "") -> None:
        if ties not in ("drop", "first") or crop not in ("center", "random") or flip not in (
                "none", "independent", "joint"):
            raise ValueError(f"bad ties={ties!r} / crop={crop!r} / flip={flip!r}")
        self.files = find_parquet_files(path, root)
        self.resolution, self.crop, self.flip, self.ties = resolution, crop, flip, ties
        self.prompt_dropout, self.max_pairs, self.seed, self.epoch = prompt_dropout, max_pairs, seed, 0
        self.both_models_contain = both_models_contain
        self.stats = PairStats()
        self._read_metadata()
        if not len(self):
            raise ConfigError(f"no usable pairs in {path} ({self.stats.summary()})")
        self.user_ids = self._read_user_ids()
        logger.info("pairs from %s: %s", path, self.stats.summary())
        self._handles: Dict[int, pq.ParquetFile] = {}
        self._group_key: Optional[Tuple[int, int]] = None
        self._group: Any = None
        self._warnings = 0

    def _read_metadata(self) -> None:
        loc: List[Tuple[int, int, int, bool, int]] = []  # file, row group, offset, swap, row id
        captions: List[str] = []
        for fi, path in enumerate(self.files):
            pf = open_parquet(path)
            names = pf.schema_arrow.names
            check_pair_columns(pf.schema_arrow, path)
            flags = [name for name in ("has_label", "are_different") if name in names]
            cols = ["caption", "label_0"] + flags + model_columns(self.both_models_contain, names, path)
            for g in range(pf.num_row_groups):
                table = read_group(pf, path, g, cols)
                has, differ = (table.column(name).to_pylist() if name in names else [True] * len(table)
                               for name in ("has_label", "are_different"))
                rows = zip(text_column(table, "caption"), table.column("label_0").to_pylist(), has,
                           self._models_wanted(table), differ)
                for off, (caption, label, ok, wanted, different) in enumerate(rows):
                    if not wanted:
                        swap, self.stats.other_models = None, self.stats.other_models + 1
                    elif different is not None and not different:  # one image twice (0 after pandas, too)
                        swap, self.stats.same_image = None, self.stats.same_image + 1
                    elif isinstance(caption, str):
                        swap = _decide(label, ok, self.ties, self.stats)
                    else:  # None or not text: no prompt to prefer an image for
                        swap, self.stats.no_caption = None, self.stats.no_caption + 1
                    if swap is not None:
                        loc.append((fi, g, off, swap, self.stats.rows))
                        captions.append(caption)
                        self.stats.empty_caption += not caption.strip()
                    self.stats.rows += 1
                    if self.max_pairs and len(captions) >= self.max_pairs:
                        return self._set_rows(loc, captions)
        self._set_rows(loc, captions)

    def _models_wanted(self, table) -> List[bool]:
        """Per row: both images' generator names contain data.both_models_contain (the official Diffusion-DPO
        `--dreamlike_pairs_only` is "dream"); every row when it is empty. A missing name does not contain it."""
        if not self.both_models_contain:
            return [True] * len(table)
        part = self.both_models_contain
        return [isinstance(a, str) and isinstance(b, str) and part in a and part in b
                for a, b in zip(text_column(table, "model_0"), text_column(table, "model_1"))]

    def _read_user_ids(self) -> Optional[List[Any]]:
        """Each pair's `user_id` (Pick-a-Pic's rater; PPD conditions on it), or None if a file lacks the column."""
        by_group: Dict[Tuple[int, int], List[Any]] = {}
        for fi, path in enumerate(self.files):
            pf = open_parquet(path)
            if "user_id" not in pf.schema_arrow.names:
                return None
            for g in sorted(set(self._groupidx[self._file == fi].tolist())):
                by_group[(fi, g)] = text_column(read_group(pf, path, g, ["user_id"]), "user_id")
        return [by_group[(f, g)][o] for f, g, o in zip(self._file.tolist(), self._groupidx.tolist(),
                                                       self._offset.tolist())]

    def _set_rows(self, loc: List[Tuple[int, int, int, bool, int]], captions: List[str]) -> None:
        arr = np.array(loc, dtype=np.int64).reshape(-1, 5)
        self._file, self._groupidx, self._offset = arr[:, 0], arr[:, 1], arr[:, 2]
        self._swap, self.row_ids, self.captions = arr[:, 3].astype(bool), arr[:, 4], list(captions)
        self.stats.used = len(self.captions)

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def raw_columns(self, file: int) -> List[str]:
        """The columns `item_from_raw` takes (a streaming reader reads them)."""
        return ["jpg_0", "jpg_1"]

    def locations(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair, in file order: file number (into `files`), row group, and row offset within that group."""
        return self._file, self._groupidx, self._offset

    def caption(self, index: int) -> str:
        """The caption without prompt dropout."""
        return self.captions[index]

    def identity(self) -> Dict[str, Any]:
        """Everything that determines the pixels and pairs (cache key); the seed only if augmentation is random."""
        random = self.crop == "random" or self.flip != "none"
        return {"files": files_identity(self.files), "resolution": self.resolution, "crop": self.crop,
                "flip": self.flip, "ties": self.ties, "max_pairs": self.max_pairs,
                "seed": self.seed if random else None,
                # only when set: caches written before the filter existed keep their key
                **({"both_models_contain": self.both_models_contain} if self.both_models_contain else {}),
                # reading 2: rows without caption text skipped, has_label 0 as unlabelled (older caches kept both);
                # 3: flip=joint with crop=random crops both images at one place (caches from before: each its own)
                "reading": 3 if (self.flip, self.crop) == ("joint", "random") else 2, "pixels": PIXEL_READING}

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers reopen files themselves
        return {**self.__dict__, "_handles": {}, "_group_key": None, "_group": None}

    def image_bytes(self, index: int) -> Tuple[Any, Any]:
        """(winner, loser) raw bytes; keeps the last row group's image columns."""
        fi, g = int(self._file[index]), int(self._groupidx[index])
        if self._group_key != (fi, g):
            table = read_row_group(self._handles, self.files, fi, g, ["jpg_0", "jpg_1"])
            self._group, self._group_key = (table.column("jpg_0"), table.column("jpg_1")), (fi, g)
        off = int(self._offset[index])
        return self.winner_loser(index, self._group[0][off].as_py(), self._group[1][off].as_py())

    def winner_loser(self, index: int, jpg_0: Any, jpg_1: Any) -> Tuple[Any, Any]:
        """Row `index`'s jpg_0 / jpg_1 ordered as (winner, loser)."""
        return (jpg_1, jpg_0) if self._swap[index] else (jpg_0, jpg_1)

    def decode(self, index: int, raw: Optional[Tuple[Any, Any]] = None
               ) -> Optional[Tuple[Image.Image, Image.Image]]:
        """(winner, loser) images of pair `index`, from `raw` = (jpg_0, jpg_1) if given, else read from the file."""
        winner, loser = self.image_bytes(index) if raw is None else self.winner_loser(index, *raw)  # read errors stop
        try:
            side = "jpg_1" if self._swap[index] else "jpg_0"  # the winner's column
            first = decode_rgb(winner)
            side = "jpg_0" if self._swap[index] else "jpg_1"
            return first, decode_rgb(loser)
        except DECODE_ERRORS as err:  # one bad row must not end a run mid-epoch
            self._warnings += 1
            log = logger.warning if self._warnings <= _MAX_WARNINGS else logger.debug
            log("%s, row group %d, row %d of it (pair %d): %s does not decode, pair skipped: %s",
                self.files[int(self._file[index])].name, int(self._groupidx[index]), int(self._offset[index]), index,
                side, err)
            return None

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index, self.decode(index))

    def item_from_raw(self, index: int, jpg_0: Any, jpg_1: Any) -> Optional[Dict[str, Any]]:
        """The item `dataset[index]` would give, from the row's jpg_0 / jpg_1 bytes read by a streaming reader."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index, self.decode(index, (jpg_0, jpg_1)))

    def _item(self, index: int, images: Optional[Tuple[Image.Image, Image.Image]]) -> Optional[Dict[str, Any]]:
        if images is None:
            return None
        u = item_draws(self.seed, self.epoch, int(self.row_ids[index]))
        flip_w = self.flip != "none" and u[1] < 0.5
        flip_l = flip_w if self.flip == "joint" else self.flip == "independent" and u[2] < 0.5
        pw, size_w, crop_w = prepare_image(images[0], self.resolution, self.crop, flip_w, u[3], u[4])
        pl, size_l, crop_l = prepare_image(images[1], self.resolution, self.crop, flip_l,  # joint: one crop too
                                           *(u[3:5] if self.flip == "joint" else u[5:7]))
        dropped = u[0] < self.prompt_dropout
        item = {"pixels_w": pw, "pixels_l": pl, **dropout_captions(self.captions[index], dropped),
                "original_size_w": size_w,
                "original_size_l": size_l, "crop_top_left_w": crop_w, "crop_top_left_l": crop_l, "index": index}
        if self.user_ids is not None:
            item["user_id"] = self.user_ids[index]
        return item

    def drop(self, indices: Sequence[int]) -> None:
        """Remove pairs (e.g. corrupt ones); row ids, hence augmentations, of the others are unchanged."""
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(indices, dtype=np.int64))
        self._file, self._groupidx, self._offset = self._file[keep], self._groupidx[keep], self._offset[keep]
        self._swap, self.row_ids = self._swap[keep], self.row_ids[keep]
        self.captions = [self.captions[i] for i in keep]
        if self.user_ids is not None:
            self.user_ids = [self.user_ids[i] for i in keep]
        self.stats.used = len(self.captions)
        self._group_key = None


def scan_corrupt(dataset: PairDataset) -> int:
    """Decode every pair once and drop the undecodable ones (for small data sets). Returns how many."""
    bad = [i for i in range(len(dataset)) if dataset.decode(i) is None]
    dataset.drop(bad)
    dataset.stats.corrupt += len(bad)
    logger.info("scanned pairs: %s", dataset.stats.summary())
    return len(bad)


def collate_pairs(items: Sequence[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Stack items, dropping None (corrupt) ones; batch["skipped"] counts them. None if all were corrupt.

    Tensors are stacked, strings and user ids listed, sizes/crops/indices become int64 tensors ([B, 2] / [B])."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    batch: Dict[str, Any] = {}
    for key, value in kept[0].items():
        values = [item[key] for item in kept]
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(value, str) or key == "user_id":  # ids as they are: ints, strings, or None (missing)
            batch[key] = values
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    batch["skipped"] = len(items) - len(kept)
    return batch


def load_pairs(cfg: Any, seed: int, root: Optional[str | Path] = None) -> PairDataset:
    """PairDataset from a `DataConfig`."""
    if not cfg.path:
        raise ValueError("data.path is empty: give a Pick-a-Pic-format parquet file or folder")
    return PairDataset(cfg.path, resolution=cfg.resolution, crop=cfg.crop, flip=cfg.flip, ties=cfg.ties,
                       prompt_dropout=cfg.prompt_dropout, max_pairs=cfg.max_pairs, seed=seed, root=root,
                       both_models_contain=cfg.both_models_contain)
