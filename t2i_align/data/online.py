"""Online batches for RAFT and online DPO: generate with the current policy, score, select, train on the choice.

Round r (every `raft.round_steps` optimizer steps): `prompts_per_round` prompts are taken from a per-epoch
shuffle of the prompt list and split across processes; each process generates K images per prompt with the
live UNet (LoRA adapters on), scores them, and the scores are gathered so that every process makes the same
global selection (`t2i_align.ranking`); then only the selected latents (and the few the round's diversity is
measured on) are gathered, not all K per prompt. Micro-batches are then drawn from the selection, each process
its own slice of every global batch. The training latents are the VAE encodings of the decoded images
(`raft.reencode`, as the official RAFT code, which trains on the saved images) or the generated latents.

Every checkpoint holds the current round's selection (`raft_pool.safetensors`): a run resumed mid-round trains
on it instead of regenerating the round with the resumed policy, so resume is exact anywhere. (A checkpoint
written before pools were saved regenerates the round.)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError
from ..engines import autocast, is_fsdp, on_every, on_main, say
from ..errors import UserError
from ..files import keep_jsonl
from ..prompts import read_prompts
from ..ranking import Selection, diversity_cells, round_metrics, select_best_of_k, select_best_worst
from ..sampling import generate, set_scheduler
from .pairs import dropout_captions

POOL_FILE = "raft_pool.safetensors"
ROUND_CHUNK_PIXELS = 256 * 512 * 512
"""A round is generated, scored and encoded in chunks of about this many pixels (256 images at 512 px, 64 at 1024
px: a fixed 256 held 3 GB of float pixels per process at SDXL's size, twice while joined), of whole batches."""
ENCODE_PIXELS = 4 * 512 * 512
"""Pixels per VAE encoder call when re-encoding a round (see `_reencode`)."""


def chunk_images(resolution: int, batch: int) -> int:
    """Images per chunk of a round: whole generation batches, about ROUND_CHUNK_PIXELS, at least one batch."""
    return batch * max(1, ROUND_CHUNK_PIXELS // (resolution * resolution * batch))


def _reward(rc, device):
    from reward_models.options import reward_on

    return reward_on(rc.reward, dict(rc.reward_options), str(device))


ROUND_STRIDE, IMAGE_STRIDE = 1_000_003, 10_000
"""Round seeds: a grid per round (image k of slot s at k·IMAGE_STRIDE + s), rounds ROUND_STRIDE apart."""


def round_seed(seed: int, rnd: int, k: int, slot: int) -> int:
    """The seed of image k of the prompt at `slot` in round `rnd`."""
    return seed + ROUND_STRIDE * rnd + IMAGE_STRIDE * k + slot


def seeds_generated(seeds: Iterable[int], seed: int, k: int, per_round: int, rounds: int) -> int:
    """How many of `seeds` a run with these settings drew round images from (`round_seed`, `rounds` rounds): an
    evaluation at those seeds starts from noises the run trained on, so it is not a fresh test."""
    hit = 0
    for s in seeds:
        for rnd in range(rounds):
            kk, slot = divmod(s - round_seed(seed, rnd, 0, 0), IMAGE_STRIDE)  # round_seed inverted
            if 0 <= kk < k and slot < per_round:
                hit += 1
                break
    return hit


def check_online_settings(rc, pairs: bool) -> List[str]:
    """The raft section's settings that depend on the objective, and its prompts (returned): checked before a run
    loads its model, and again by the source."""
    if pairs and rc.k < 2:
        raise ConfigError(f"raft.k = {rc.k}: online DPO pairs the best and worst of K images, so it needs raft.k >= 2")
    if not pairs and rc.min_gap:
        raise ConfigError(f"raft.min_gap = {rc.min_gap}: only online DPO (objective dpo) makes pairs; RAFT "
                          "(objective sft or seppo) keeps the best image of each prompt. Leave raft.min_gap at 0")
    if rc.reward == "decomposed-clip":
        _check_fixed_direction(dict(rc.reward_options), rc.prompts)
    return read_prompts(rc.prompts, "raft.prompts")


def _check_fixed_direction(options: Dict, prompts: str) -> None:
    """decomposed-clip ranks a round's images only with one common direction for all of them: `direction=batch`
    scored each against the mean text of the chunk it was scored in (winners depending on the chunking and the
    number of processes; a chunk of one prompt failed with a traceback), and no direction failed after the model
    had loaded."""
    import inspect

    from reward_models.decomposed_clip import DecomposedClip

    omega = options.get("omega", inspect.signature(DecomposedClip).parameters["omega"].default)
    fit = f"raft.reward_options.fit_prompts={prompts} (fitted once from the round prompts) or direction=FILE"
    if options.get("direction") is not None and options.get("fit_prompts") is not None:
        raise ConfigError("raft.reward_options: give direction or fit_prompts, not both")
    if options.get("direction") == "batch":
        raise ConfigError("raft.reward_options.direction=batch: each image would be scored against the mean text of "
                          f"the images scored with it, so the winners would depend on the batching; use {fit}")
    if options.get("direction") is None and options.get("fit_prompts") is None and float(omega) != 1.0:
        raise ConfigError(f"raft.reward=decomposed-clip needs its common direction: set {fit}")


class EmptyRoundError(UserError, RuntimeError):
    """A round left nothing to train on (every score non-finite, or no pair with the required gap)."""


class OnlineSource:
    def __init__(self, cfg, components, accelerator, batch_kind: str):
        self.cfg, self.rc, self.components, self.acc = cfg, cfg.raft, components, accelerator
        self.pairs = batch_kind == "pairs"
        self.prompts = check_online_settings(cfg.raft, self.pairs)
        self.data_rows = len(self.prompts)  # what the rounds draw from: a resume checks it is unchanged
        self.reward = _reward(self.rc, accelerator.device)
        self._check_reward_reads_prompts()
        self.micro_per_round = self.rc.round_steps * cfg.train.grad_accum
        self._metrics: Dict[str, float] = {}
        self._nonfinite_total = 0
        self._current: Optional[Tuple[int, List[Dict]]] = None  # (round, selection) being trained on
        self._resumed: Optional[Tuple[int, List[Dict], Dict[str, float]]] = None  # from a checkpoint's pool

    def _check_reward_reads_prompts(self) -> None:
        """A reward that cannot score the prompts (toy-judge reads only toy captions) is a config error at
        start-up, not a traceback at the first round."""
        from reward_models.base import PromptsRejected

        try:
            self.reward.check_prompts(self.prompts)
        except PromptsRejected as err:
            raise ConfigError(f"raft.reward = {self.rc.reward!r} cannot score raft.prompts ({self.rc.prompts}): "
                              f"{err}. Choose a reward that reads these prompts (e.g. toy-clip, clip)") from None

    def sample_captions(self, n: int) -> List[str]:
        return self.prompts[:n]

    def metrics(self) -> Dict[str, float]:
        """The latest round's figures (see `ranking.round_metrics`) and running totals."""
        return dict(self._metrics, **{"raft/nonfinite_dropped_total": float(self._nonfinite_total)})

    def micro_batches(self, start: int = 0) -> Iterator[Dict]:
        rnd, skip = divmod(start, self.micro_per_round)
        resumed = self._resumed_round(rnd) if skip else None
        if start:  # a resume: rounds from the first one generated again belong to the abandoned run
            first = rnd + (resumed is not None)
            on_main(self.acc, lambda: self._forget_rounds_from(first), "the main process could not rewrite "
                    "raft_rounds.jsonl")
        while True:
            items = resumed or self._round(rnd)
            resumed = None
            self._current = (rnd, items)
            order = self._order(rnd, len(items))
            b, world, rank = self.cfg.train.batch_size, self.acc.num_processes, self.acc.process_index
            for i in range(skip, self.micro_per_round):
                first = (i * world + rank) * b
                yield self._collate([self._drop_prompt(items[order[pos]], rnd, pos) for pos in range(first, first + b)])
            rnd, skip = rnd + 1, 0

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> None:
        """The round being trained on, into a checkpoint folder (main process; the selection is global, the
        same on every process)."""
        if self._current is None:
            return
        from safetensors.torch import save_file

        rnd, items = self._current
        tensors = {key: torch.stack([it[key] for it in items]).contiguous()
                   for key in items[0] if key != "caption"}
        meta = {"round": str(rnd), "captions": json.dumps([it["caption"] for it in items]),
                "metrics": json.dumps(self._metrics), "nonfinite_total": str(self._nonfinite_total)}
        save_file(tensors, str(Path(folder) / POOL_FILE), metadata=meta)

    def load(self, folder: Path) -> None:
        """Read a checkpoint's pool (every process); `micro_batches` uses it if it resumes inside that round."""
        path = Path(folder) / POOL_FILE
        if not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        if set(tensors) != ({"latents_w", "latents_l"} if self.pairs else {"latents"}):
            return  # written by the other objective (sft vs dpo): regenerate
        captions = json.loads(meta["captions"])
        items = [{"caption": c, **{key: t[i] for key, t in tensors.items()}} for i, c in enumerate(captions)]
        self._resumed = (int(meta["round"]), items, json.loads(meta["metrics"]))
        self._nonfinite_total = int(meta.get("nonfinite_total", 0))

    def _resumed_round(self, rnd: int) -> Optional[List[Dict]]:
        if self._resumed is None or self._resumed[0] != rnd:
            return None
        _, items, self._metrics = self._resumed
        self._resumed = None
        return items

    # ------------------------------------------------------------------ one round
    def _round_prompts(self, rnd: int) -> List[int]:
        """Positions rnd·P .. rnd·P + P - 1 of the concatenated per-epoch shuffles of the prompt list."""
        n, per = len(self.prompts), self.rc.prompts_per_round
        perms: Dict[int, List[int]] = {}
        out = []
        for pos in range(rnd * per, (rnd + 1) * per):
            epoch, i = divmod(pos, n)
            if epoch not in perms:
                gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
                perms[epoch] = torch.randperm(n, generator=gen).tolist()
            out.append(perms[epoch][i])
        return out

    def _order(self, rnd: int, n: int) -> List[int]:
        """Enough shuffled passes over the selection for the round's global micro-batches."""
        need = self.micro_per_round * self.acc.num_processes * self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(self.cfg.seed * 7_919 + rnd)
        passes = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        return torch.cat(passes)[:need].tolist()

    def _round(self, rnd: int) -> List[Dict]:
        from accelerate.utils import gather_object

        began = time.time()
        prompts = self._round_prompts(rnd)
        mine = list(range(self.acc.process_index, len(prompts), self.acc.num_processes))
        local: List = []

        def work() -> None:
            local.extend(self._generate_and_score(rnd, [prompts[j] for j in mine], mine))

        if is_fsdp(self.acc):  # sampling is collective there: a failure in it cannot be told after it
            work()
        else:  # one process failing (out of memory, its reward) stops all, not only itself
            on_every(self.acc, work, "another process could not generate or score its RAFT samples")
        # Only scores travel to every process; then only the latents that are trained on or measured
        rows = sorted(gather_object([row[:3] for row in local]), key=lambda row: row[0])
        scores = torch.stack([row[2] for row in rows])
        selection = select_best_worst(scores, self.rc.top_fraction, self.rc.min_gap) if self.pairs \
            else select_best_of_k(scores, self.rc.top_fraction)
        self._nonfinite_total += selection.dropped_nonfinite
        if not selection.picks:
            raise EmptyRoundError(self._empty_message(rnd, scores, selection))
        latents = self._gather_latents(local, {(p, k) for p, *ks in selection.picks for k in ks}
                                       | set(diversity_cells(*scores.shape)))
        self._metrics = dict(round_metrics(scores, latents, selection), **{
            "raft/round": float(rnd), "raft/generation_s": time.time() - began})
        self._record(rnd, rows, selection)
        return [self._item(rows[p][1], [latents[(p, k)] for k in ks]) for p, *ks in selection.picks]

    @staticmethod
    def _gather_latents(local, cells) -> Dict[Tuple[int, int], torch.Tensor]:
        """(prompt, k) -> latent on every process, for `cells` of the round (each process sends those it made)."""
        from accelerate.utils import gather_object

        # clones: gather_object pickles a view with its whole storage (all K latents of the prompt)
        mine = [((slot, k), lat[k].clone()) for slot, _, _, lat in local for k in range(len(lat)) if (slot, k) in cells]
        return dict(gather_object(mine))

    def _record(self, rnd: int, rows, selection: Selection) -> None:
        """Append the round's pool and choice to raft_rounds.jsonl (main process; every process stops if it
        fails), to audit what was trained on."""
        on_main(self.acc, lambda: self._write_record(rnd, rows, selection), "the main process could not record the "
                "RAFT round")

    def _write_record(self, rnd: int, rows, selection: Selection) -> None:
        scores = [[x if math.isfinite(x) else None for x in row[2].tolist()] for row in rows]
        record = {"round": rnd, "prompts": [row[1] for row in rows], "scores": scores,
                  "selected": [list(p) for p in selection.picks], "nonfinite": selection.dropped_nonfinite}
        path = self._rounds_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _rounds_file(self) -> Path:
        return Path(self.cfg.output_dir) / "raft_rounds.jsonl"

    def _forget_rounds_from(self, first: int) -> None:
        """Main process: drop the audit lines of rounds >= `first`, as metrics.jsonl drops the steps after the
        checkpoint: the file then reads as one uninterrupted run."""
        path = self._rounds_file()
        if not path.is_file():
            return
        torn = keep_jsonl(path, lambda record: record.get("round", first) < first)
        if torn:
            say(self.acc, f"{path}: dropped {torn} line(s) that were not JSON (written as the run stopped?)")

    @torch.no_grad()
    def _generate_and_score(self, rnd: int, prompt_ids: List[int], slots: List[int]):
        """[(slot, prompt, scores [K], latents [K, C, h, w])] for this process's prompts."""
        if not prompt_ids:
            return []
        k = self.rc.k
        texts = [self.prompts[i] for i in prompt_ids]
        flat = [t for t in texts for _ in range(k)]
        seeds = [round_seed(self.cfg.seed, rnd, kk, slot) for slot in slots for kk in range(k)]
        # In chunks of whole generation batches (the same batches as one call): only a chunk's decoded images are
        # held at a time (300 prompts x 16 at 512 px: 15 GB of float pixels), then scored and encoded
        size = self.rc.resolution or self.components.unet.config.sample_size * self.components.vae_scale_factor
        step = chunk_images(size, self.rc.generation_batch_size)
        scores, latents = [], []
        for i in range(0, len(flat), step):
            samples = self._sample(flat[i:i + step], seeds[i:i + step])
            chunk = self.reward(samples.images, flat[i:i + step])[0].detach().float().cpu()
            lat = self._reencode(samples.images) if self.rc.reencode else samples.latents
            # a NaN image (a diverging UNet, an fp16 VAE) scores as a black one with some rewards: never pick it,
            # its NaN latents would make every step that trains on it non-finite
            bad = ~(torch.isfinite(samples.images).flatten(1).all(1) & torch.isfinite(lat).flatten(1).all(1))
            scores.append(chunk.masked_fill(bad.cpu(), float("nan")))
            latents.append(lat)
        scores = torch.cat(scores).reshape(len(texts), k)
        lat = torch.cat(latents).reshape(len(texts), k, *latents[0].shape[1:])
        # clones: gather_object pickles a view with its whole storage, every row the whole round's scores
        return [(slot, texts[i], scores[i].clone(), lat[i]) for i, slot in enumerate(slots)]

    def _sample(self, prompts: List[str], seeds: List[int]):
        from ..models import build_pipeline

        unet = self.components.unet
        pipe = set_scheduler(build_pipeline(self.components, unet=unet), self.rc.scheduler)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        try:
            with autocast(self.acc):
                return generate(pipe, prompts, seeds, num_inference_steps=self.rc.sample_steps,
                                guidance_scale=self.rc.guidance_scale, batch_size=self.rc.generation_batch_size,
                                negative_prompt=self.rc.negative_prompt, height=self.rc.resolution,
                                width=self.rc.resolution, retry_oom=not is_fsdp(self.acc),
                                steps_setting="raft.sample_steps")
        finally:
            unet.train(was_training)

    def _reencode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of the decoded images, as the data path encodes pixels (`batches.encode_images`)."""
        from ..batches import encode_images

        # at most four 512 px images a VAE call (~0.7 GB of fp32 activations each; SDXL at 1024 px one at a time:
        # 32 in one call would need ~84 GB), as `sampling._decode` slices; small (toy) images keep the batch
        step = max(1, min(self.rc.generation_batch_size, ENCODE_PIXELS // (images.shape[-2] * images.shape[-1])))
        return torch.cat([encode_images(self.components, images[i:i + step] * 2 - 1).cpu()
                          for i in range(0, len(images), step)])

    def _drop_prompt(self, item: Dict, rnd: int, position: int) -> Dict:
        """`data.prompt_dropout` applies here as to a data set, so the unconditional branch (used by classifier-free
        guidance) learns from the samples too."""
        p = self.cfg.data.prompt_dropout
        dropped = bool(p) and np.random.default_rng([self.cfg.seed % 2**63, rnd, position]).random() < p
        return dict(item, **dropout_captions(item["caption"], dropped))

    def _item(self, prompt: str, latents: List[torch.Tensor]) -> Dict:
        if self.pairs:
            return {"caption": prompt, "latents_w": latents[0], "latents_l": latents[1]}
        return {"caption": prompt, "latents": latents[0]}

    def _collate(self, items: List[Dict]) -> Dict:
        batch = {}
        for key in items[0]:  # tensors stacked, captions listed
            values = [it[key] for it in items]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        if self.components.spec.uses_time_ids:  # SDXL: generated at the target size, uncropped
            h, w = (int(d * self.components.vae_scale_factor) for d in batch["latents_w" if self.pairs else
                                                                             "latents"].shape[-2:])
            if self.pairs:
                for side in ("w", "l"):
                    batch[f"original_size_{side}"] = [(h, w)] * len(items)
                    batch[f"crop_top_left_{side}"] = [(0, 0)] * len(items)
            else:
                from ..conditioning.text import sdxl_time_ids
                batch["time_ids"] = sdxl_time_ids((h, w), (0, 0), (h, w), batch_size=len(items))
        return batch

    def _empty_message(self, rnd: int, scores: torch.Tensor, selection: Selection) -> str:
        what = f"no pair with a reward gap > {self.rc.min_gap}" if self.pairs else "no image with a finite score"
        more = ", or lower raft.min_gap" if self.pairs and self.rc.min_gap else ""
        return (f"RAFT round {rnd}: {what} among {scores.shape[0]} prompts x {scores.shape[1]} images "
                f"({selection.dropped_nonfinite} non-finite scores). Check the reward {self.rc.reward!r} on a few "
                f"generated images (t2i-score), or raise raft.k / raft.prompts_per_round{more}.")
