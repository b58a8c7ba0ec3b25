"""Export judged toy pairs in the Pick-a-Pic v2 parquet format, so one loader serves real and toy data.

K images per prompt are sampled at fixed seeds and judged, then paired and labelled by the judge: label_0 = 1
if image 0 scores higher, 0 if lower, 0.5 for a tie (as in Pick-a-Pic, where 0.5 marks a tie). Pairing:
"random" shuffles the K images into K // 2 disjoint pairs (unbiased, ties included, like human-labelled data);
"best-worst" keeps one pair per prompt, the judge's best and worst image (the widest margin, as RAFT-style
online DPO builds its pairs).
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..data.listings import write_rows_parquet
from ..files import write_text_atomic
from ..sampling import generate, seeds_for
from .evaluate import TOY_GUIDANCE, TOY_STEPS
from ..gallery import to_uint8
from .judge import judge_batch
from .scenes import PAIR_SEED, Scene, short_caption  # noqa: F401 (PAIR_SEED for importers)



def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _label(score_0: float, score_1: float) -> float:
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


def _pairs(scores: List[float], rng: random.Random, pairing: str) -> List[tuple]:
    order = list(range(len(scores)))
    rng.shuffle(order)  # random image 0 / image 1 sides in both modes
    if pairing == "random":
        return list(zip(order[0::2], order[1::2]))
    best = max(order, key=lambda i: scores[i])
    worst = min(order, key=lambda i: scores[i])
    if best == worst:  # every image scores the same: a tie of two images (counted as one), not one image twice
        worst = next(i for i in order if i != best)
    return [(best, worst) if rng.random() < 0.5 else (worst, best)]


def _pair_rows(caption: str, images: List[np.ndarray], scores: List[float], rng: random.Random,
               model: str, first_id: int, pairing: str = "random") -> List[Dict]:
    rows = []
    for a, b in _pairs(scores, rng, pairing):
        label_0 = _label(scores[a], scores[b])
        rows.append({"caption": caption, "jpg_0": jpeg_bytes(images[a]), "jpg_1": jpeg_bytes(images[b]),
                     "label_0": label_0, "label_1": 1.0 - label_0, "user_id": 0,
                     "are_different": bool(not np.array_equal(images[a], images[b])), "has_label": True,
                     "model_0": model, "model_1": model, "ranking_id": first_id + len(rows)})
    return rows


def write_parquet(rows: Sequence[Dict], path: Path) -> None:
    """Rows with the Pick-a-Pic column types, in one row group (as the toy results were made with)."""
    write_rows_parquet(rows, Path(path))


def export_pairs(pipe, scenes: Sequence[Scene], out_dir: str | os.PathLike, images_per_prompt: int = 4,
                 base_seed: int = 0, model_name: str = "toy-base", prompts_per_batch: int = 32,
                 pairing: str = "random", progress: Optional[Callable[[int], object]] = None) -> Dict:
    """Sample, judge and pair; write out_dir/pairs.parquet and out_dir/pairs.json (counts). Returns the counts.

    `progress`, if given, is called with the number of images sampled after each generation batch (they add up
    to len(scenes) * images_per_prompt); pass a tqdm bar's `update` to show one.
    """
    if pairing not in ("random", "best-worst"):
        raise ValueError(f"pairing={pairing!r}: use random or best-worst")
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt={images_per_prompt}: need at least 2 images per prompt to make pairs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(base_seed)
    seeds = seeds_for(len(scenes), images_per_prompt, base_seed)
    rows: List[Dict] = []
    for start in range(0, len(scenes), prompts_per_batch):
        chunk = list(scenes[start:start + prompts_per_batch])
        flat = [s for s in chunk for _ in range(images_per_prompt)]
        flat_seeds = [x for row in seeds[start:start + len(chunk)] for x in row]
        samples = generate(pipe, [short_caption(s) for s in flat], flat_seeds, num_inference_steps=TOY_STEPS,
                           guidance_scale=TOY_GUIDANCE, progress=progress)
        images = to_uint8(samples.images)
        scores = [v.score for v in judge_batch(images, flat)]
        for i, scene in enumerate(chunk):
            sl = slice(i * images_per_prompt, (i + 1) * images_per_prompt)
            rows += _pair_rows(short_caption(scene), images[sl], scores[sl], rng, model_name, len(rows), pairing)
    (out / "pairs.json").unlink(missing_ok=True)  # a kill between the two writes: no counts of an earlier export
    write_parquet(rows, out / "pairs.parquet")
    counts = {"pairs": len(rows), "ties": sum(r["label_0"] == 0.5 for r in rows), "prompts": len(scenes),
              "images_per_prompt": images_per_prompt, "pairing": pairing, "base_seed": base_seed,
              "path": str(out / "pairs.parquet")}
    write_text_atomic(out / "pairs.json", json.dumps(counts, indent=2))
    return counts
