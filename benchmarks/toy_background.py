"""Which background does a toy model draw, per background the prompt asks for? The held-out prompts' short
captions × 4 seeds (seed 0), each image's background read by the judge; prints one row per asked background.

    python benchmarks/toy_background.py [--lora RUN/final]
"""
import argparse
import collections

from t2i_align.gallery import to_uint8
from t2i_align.sampling import load_pipeline
from t2i_align.toy.evaluate import evaluate, prompt_set
from t2i_align.toy.judge import read_attributes
from t2i_align.toy.scenes import BACKGROUNDS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", default=None)
    args = p.parse_args()
    scenes = prompt_set("heldout")
    ev = evaluate(load_pipeline("toy", lora=args.lora), scenes, seeds_per_prompt=4, base_seed=0)
    drawn = collections.Counter()
    for scene, image in zip(ev.scenes, to_uint8(ev.samples.images)):
        drawn[(scene.background, read_attributes(image)["background"])] += 1
    for asked in BACKGROUNDS:
        total = sum(drawn[(asked, d)] for d in BACKGROUNDS)
        print(f"asked {asked:6s}: " + ", ".join(f"{d} {drawn[(asked, d)]}/{total}" for d in BACKGROUNDS))


if __name__ == "__main__":
    main()
