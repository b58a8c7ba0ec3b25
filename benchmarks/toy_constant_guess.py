"""What a model that always draws each attribute's most common held-out value would score: the held-out split
(`scenes.split_scenes`) is not balanced (23 of its 60 scenes are on gray), so 'chance' (1 / the number of values)
understates what a constant guess gets. Prints JSON: per attribute the value, its share of the 60 prompts, and the
judge score such a model gets (the mean of the five shares). No sampling; seconds.

    python benchmarks/toy_constant_guess.py
"""
import argparse
import json
from collections import Counter

from t2i_align.toy.evaluate import prompt_set
from t2i_align.toy.scenes import ATTRIBUTES


def constant_guess(name: str = "heldout") -> dict:
    scenes = prompt_set(name)
    out = {}
    for attribute in ATTRIBUTES:
        value, count = Counter(getattr(s, attribute) for s in scenes).most_common(1)[0]
        out[attribute] = {"value": value, "share": round(count / len(scenes), 3)}
    out["overall"] = round(sum(v["share"] for v in out.values()) / len(ATTRIBUTES), 3)
    return out


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(json.dumps(constant_guess(), indent=1))
