"""Does the decomposed toy-CLIP reward track the toy judge? For `benchmarks/longalign_toy.py judge --reward`
records: the Pearson correlation, image by image, of each reward part (total S, text-relevant, text-irrelevant,
S_ω) with the judge score and with each attribute's correctness.

    python benchmarks/longalign_reward_correlation.py runs/longalign-eval/base_clip77_long.json [more.json ...]
"""
import argparse
import json

import numpy as np


def correlations(record: dict) -> dict:
    score = np.asarray(record["score"], dtype=float)
    parts = {k: np.asarray(v, dtype=float) for k, v in record["reward"].items() if len(v) == len(score)}
    targets = {"judge": score, **{a: np.asarray(c, dtype=float) for a, c in record["correct"].items()}}
    return {t: {k: round(float(np.corrcoef(v, y)[0, 1]), 3) for k, v in parts.items()} for t, y in targets.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="`longalign_toy.py judge --reward` JSON records")
    paths = parser.parse_args().records
    print(json.dumps({path: correlations(json.load(open(path))) for path in paths}, indent=1))
