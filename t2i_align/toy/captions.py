"""Export toy image-caption data (LongAlign stage 1's format: `caption` + `jpg`) with ground-truth images.

Each scene of the prompt set is rendered `per_scene` times (the same small position jitter as the toy build) and
captioned without label noise: with its six-sentence `long_caption` (fillers shuffled per row; the background
sentence lies beyond CLIP's 77 tokens, so only a long-text encoding can learn it), its one-sentence
`short_caption`, or either at random ("mixed"). Read back by `t2i_align.data.captions` (data.kind=captions).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Dict, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .pairs import jpeg_bytes
from .scenes import Scene, long_caption, render, short_caption

CAPTION_KINDS = ("long", "short", "mixed")


def _caption(scene: Scene, kind: str, rng: random.Random) -> str:
    if kind == "mixed":
        kind = rng.choice(("long", "short"))
    return long_caption(scene, rng) if kind == "long" else short_caption(scene)


def export_captions(out: str | Path, scenes: Sequence[Scene], per_scene: int = 8, caption: str = "long",
                    seed: int = 0, row_group_size: int = 256) -> Dict:
    """Write out/captions.parquet (caption, jpg, plus the scene's attributes for inspection); returns a summary.

    The file is written to a temporary name and renamed, so it is complete or absent."""
    if caption not in CAPTION_KINDS:
        raise ValueError(f"unknown caption kind {caption!r}; use one of {CAPTION_KINDS}")
    if per_scene < 1:
        raise ValueError(f"per_scene must be at least 1, got {per_scene}")
    rng = random.Random(seed)
    rows = []
    for _ in range(per_scene):
        for scene in scenes:
            rows.append({"caption": _caption(scene, caption, rng), "jpg": jpeg_bytes(render(scene, rng)),
                         **scene.as_dict()})
    rng.shuffle(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "captions.parquet"
    tmp = out / ".captions.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)
    return {"path": str(path), "rows": len(rows), "scenes": len(scenes), "per_scene": per_scene,
            "caption": caption, "seed": seed}
