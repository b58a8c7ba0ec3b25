"""`make demo`: sample the shipped toy base model at fixed seeds, judge it, write a gallery and the judge JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

from ..gallery import write_gallery
from ..sampling import load_pipeline
from .assets import verify_assets
from .evaluate import Evaluation, evaluate, prompt_set
from .judge import to_uint8

GALLERY_PROMPTS = 12


def _caption(verdict) -> str:
    wrong = [a for a, ok in verdict.correct.items() if not ok]
    return f"judge {verdict.score:.1f}" + (f" · wrong: {', '.join(wrong)}" if wrong else "")


def gallery_rows(ev: Evaluation, num_prompts: int = GALLERY_PROMPTS):
    """One gallery row per prompt: its seeds' images with the judge's verdict under each."""
    k = ev.summary["seeds_per_prompt"]
    images = to_uint8(ev.samples.images)
    rows = []
    for i in range(min(num_prompts, len(images) // k)):
        sl = slice(i * k, (i + 1) * k)
        rows.append({"prompt": ev.samples.prompts[i * k], "images": images[sl],
                     "captions": [_caption(v) for v in ev.verdicts[sl]],
                     "meta": {"seeds": ", ".join(map(str, ev.samples.seeds[sl]))}})
    return rows


def _write_json(data: Dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_demo(out: Path, seeds_per_prompt: int = 4) -> Dict:
    verify_assets()
    pipe = load_pipeline("toy")
    ev = evaluate(pipe, prompt_set("heldout"), seeds_per_prompt=seeds_per_prompt)
    out.mkdir(parents=True, exist_ok=True)
    gallery = write_gallery(out / "gallery", gallery_rows(ev), title="t2i-align toy base model (held-out prompts)",
                            columns=[f"seed {k}" for k in range(seeds_per_prompt)])
    result = dict(ev.summary, model="toy", prompts="heldout", gallery=str(gallery / "index.html"),
                  grid=str(gallery / "grid.png"))
    _write_json(result, out / "judge.json")
    return result
