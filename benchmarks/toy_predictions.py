"""Is a toy model's gain on an attribute a bias towards the held-out set's common values? The 60 held-out scenes
are not balanced (23 on gray, 23 squares: `benchmarks/toy_constant_guess.py`), so drawing gray more often raises
background accuracy without following the prompt. For each model (the base and LoRAs) on the held-out prompts x 8
seeds: per attribute the accuracy, the balanced accuracy (the mean over the values asked for of the accuracy on
the prompts asking for it: a constant guess gets 1 / the number of values) and how often the judge reads each
value; and colour read from the object's core pixels only (the half farthest from the background), to tell a real
colour change from the judge reading edge pixels blended with the background. About a minute per model on the
2-core CPU.

    python benchmarks/toy_predictions.py --model dpo=runs/toy-dpo/final [--seed 0] [--out predictions.json]
"""
import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from t2i_align.files import write_text_atomic
from t2i_align.gallery import to_uint8
from t2i_align.sampling import load_pipeline
from t2i_align.toy.assets import pipeline_dir
from t2i_align.toy.evaluate import evaluate, prompt_set
from t2i_align.toy.judge import _MIN_OBJECT_PIXELS, _OBJECT_DISTANCE, _nearest
from t2i_align.toy.scenes import ATTRIBUTES, OBJECT_COLORS


def core_colour(image: np.ndarray):
    """The judge's colour reading (`judge.read_attributes`) from the object's pixels farthest from the background."""
    img = image.astype(np.float32)
    background = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    distance = np.sqrt(((img - background) ** 2).sum(-1))
    mask = distance > _OBJECT_DISTANCE
    if mask.sum() < _MIN_OBJECT_PIXELS:
        return None
    core = img[mask][distance[mask] >= np.median(distance[mask])]
    return _nearest(np.median(core, axis=0), OBJECT_COLORS)


def attribute_table(evaluation) -> dict:
    out = {}
    for a in ATTRIBUTES:
        by_value = defaultdict(list)
        for scene, verdict in zip(evaluation.scenes, evaluation.verdicts):
            by_value[getattr(scene, a)].append(float(verdict.correct[a]))
        read = Counter(str(v.predicted[a]) for v in evaluation.verdicts)
        n = len(evaluation.verdicts)
        out[a] = {"accuracy": round(sum(sum(v) for v in by_value.values()) / n, 3),
                  "balanced_accuracy": round(sum(sum(v) / len(v) for v in by_value.values()) / len(by_value), 3),
                  "per_value_accuracy": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_value.items())},
                  "read_as": {k: round(c / n, 3) for k, c in read.most_common()}}
    cores = [core_colour(im) == s.color for im, s in zip(to_uint8(evaluation.samples.images), evaluation.scenes)]
    out["color"]["core_pixel_accuracy"] = round(float(np.mean(cores)), 3)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=LORA", help="a LoRA to judge; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    models = {"base": None, **dict(m.split("=", 1) for m in args.model)}
    result = {"seed": args.seed, "seeds_per_prompt": 8, "models": {}}
    from tqdm.auto import tqdm

    scenes = prompt_set("heldout")
    for name, lora in models.items():
        pipe = load_pipeline(pipeline_dir(), lora=lora)
        with tqdm(total=len(scenes) * 8, desc=f"judge {name}", unit="img", file=sys.stderr) as bar:
            result["models"][name] = attribute_table(evaluate(pipe, scenes, 8, args.seed, progress=bar.update))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out), json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
