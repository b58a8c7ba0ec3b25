"""How lenient the toy judge is: its scores on images that are not the scene asked for (session 22's review).

The judge (`t2i_align/toy/judge.py`) never rejects an image: colour and background go to the nearest palette entry
however far off, every pixel far from the border colour is "object", and the shape is the best-fitting template of
that mask. So degraded images still earn credit. Probes, each over the 60 held-out scenes (renders: no model):

- clean renders (the judge's ceiling); the background colour alone (no object);
- the right background plus Gaussian pixel noise of sd `--noise` and no object; uniform noise;
- clean renders blurred by a Gaussian of sd 1.0 and 1.5 px (soft edges, as a model's samples have): shape accuracy;
- prompt-blind layouts (session 30's review): the asked colour and background, but always a disc of radius 6 at the
  centre, or the whole frame inside a 1-px border: colour + background are 0.4 of the score, chance does the rest,
  so an overall score near these says little; read gains per attribute.

    python benchmarks/judge_probes.py --out benchmarks/results/judge_probes.json

Deterministic (seed 0), seconds on a CPU.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
from PIL import Image, ImageFilter

from t2i_align.files import write_json_atomic
from t2i_align.toy.evaluate import prompt_set
from t2i_align.toy.judge import judge_image
from t2i_align.toy.scenes import ATTRIBUTES, BACKGROUNDS, IMAGE_SIZE, OBJECT_COLORS, render


def _probe(make: Callable[[object, np.random.Generator], np.ndarray], seed: int = 0) -> Dict:
    """Mean judge score and per-attribute accuracy of `make(scene, rng)` over the held-out scenes."""
    rng = np.random.default_rng(seed)
    verdicts = [judge_image(make(scene, rng), scene) for scene in prompt_set("heldout")]
    return {"score": float(np.mean([v.score for v in verdicts])),
            **{a: float(np.mean([v.correct[a] for v in verdicts])) for a in ATTRIBUTES}}


def _background(scene, noise_sd: float, rng) -> np.ndarray:
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    return np.clip(img + rng.normal(0.0, noise_sd, img.shape), 0, 255).astype(np.uint8)


def _blurred(scene, sigma: float, rng) -> np.ndarray:
    image = Image.fromarray(render(scene, random.Random(int(rng.integers(1 << 30)))))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)))


def _blind(scene, layout: str) -> np.ndarray:
    """The scene's colour on its background in a fixed layout, whatever its shape, size and position."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    ys, xs = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    centre = (IMAGE_SIZE - 1) / 2
    inside = ((ys - centre) ** 2 + (xs - centre) ** 2 <= 36) if layout == "disc" else \
        ((ys > 0) & (ys < IMAGE_SIZE - 1) & (xs > 0) & (xs < IMAGE_SIZE - 1))
    img[inside] = OBJECT_COLORS[scene.color]
    return img


def probes(noise_sd: float = 40.0) -> Dict[str, Dict]:
    return {
        "clean render": _probe(lambda s, rng: render(s, random.Random(int(rng.integers(1 << 30))))),
        "background only": _probe(lambda s, rng: _background(s, 0.0, rng)),
        f"background + noise sd {noise_sd:g}, no object": _probe(lambda s, rng: _background(s, noise_sd, rng)),
        "uniform noise": _probe(lambda s, rng: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)),
        "render blurred sd 1.0 px": _probe(lambda s, rng: _blurred(s, 1.0, rng)),
        "render blurred sd 1.5 px": _probe(lambda s, rng: _blurred(s, 1.5, rng)),
        "prompt-blind: the colour as a centred disc": _probe(lambda s, rng: _blind(s, "disc")),
        "prompt-blind: the colour filling the frame": _probe(lambda s, rng: _blind(s, "frame")),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", type=float, default=40.0, help="sd of the pixel noise on the background probe")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.noise >= 0:
        p.error(f"--noise {args.noise}: give a standard deviation >= 0")
    if args.out and (args.out.is_dir() or any(d.is_file() for d in args.out.parents)):  # found after the probes
        p.error(f"--out {args.out}: a folder, or a path under a file; give a .json file's path")
    result = probes(args.noise)
    print("| probe | judge score | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---|" + "---|" * len(ATTRIBUTES))
    for name, r in result.items():
        print(f"| {name} | {r['score']:.3f} | " + " | ".join(f"{r[a]:.3f}" for a in ATTRIBUTES) + " |")
    if args.out:
        write_json_atomic(args.out, {"held_out_scenes": 60, "seed": 0, "probes": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
