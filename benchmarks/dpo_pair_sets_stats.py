"""What the toy judge says of each pair set's winners and losers, per attribute, beside the gain DPO took from it.

Toy DPO gains on some fresh pair sets and not on others (benchmarks/dpo_pair_sets_toy_runs.sh). This reads each
pair set (no sampling, no training: seconds) and judges both images of every pair against its caption's scene, as
stored (JPEG: the images DPO trains on; the pairs were ranked on the uncompressed samples, and JPEG's colour
subsampling moves a shape verdict now and then):
per attribute, how often the winner is right, the loser is right, and the winner right where the loser is wrong
minus the reverse (the attribute's net preference signal in the pairs). With the table's JSON it adds each set's
judged gain over the base and colour change (its training seed 0), so the two can be read side by side, and each
trained run's end of training (the p<seed>-t<seed>/ runs beside the pair sets: metrics.jsonl over the last 100
steps: DPO's implicit accuracy, and the policy's error on winners and losers above the reference's). Four pair sets
are no sample for a correlation: the output describes, it tests nothing.

    python benchmarks/dpo_pair_sets_stats.py --pairs-root runs/dpo-pair-sets \
        --table benchmarks/results/dpo_pair_sets_table_seed0.json --out benchmarks/results/dpo_pair_sets_stats.json
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from t2i_align.files import write_json_atomic
from t2i_align.toy.judge import judge_batch
from t2i_align.toy.scenes import ATTRIBUTES, scene_from_caption


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pair_set_stats(path: Path) -> Dict:
    """Per attribute over the set's decided pairs: the winners' and losers' rate of being right, and the net
    signal P(winner right, loser wrong) - P(loser right, winner wrong)."""
    rows = [r for r in pq.read_table(path, columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist()
            if r["label_0"] != 0.5]
    scenes = [scene_from_caption(r["caption"]) for r in rows]
    winners = judge_batch([_image(r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"]) for r in rows], scenes)
    losers = judge_batch([_image(r["jpg_1"] if r["label_0"] == 1.0 else r["jpg_0"]) for r in rows], scenes)
    out = {"pairs": len(rows), "winner_score": float(np.mean([v.score for v in winners])),
           "loser_score": float(np.mean([v.score for v in losers])), "per_attribute": {}}
    for name in ATTRIBUTES:
        w = np.array([v.correct[name] for v in winners])
        lo = np.array([v.correct[name] for v in losers])
        each = (w & ~lo).astype(float) - (lo & ~w)  # +1, 0 or -1 per pair: the net signal is its mean
        out["per_attribute"][name] = {"winner": float(w.mean()), "loser": float(lo.mean()), "net": float(each.mean()),
                                      "net_standard_error": float(each.std(ddof=1) / np.sqrt(len(each)))}
    return out


def _gains(table: Optional[Path]) -> Dict[str, Dict]:
    """Pair seed -> the training-seed-0 model's judged difference from the base and its colour change."""
    if table is None:
        return {}
    rows = {r["model"]: r for r in json.loads(table.read_text())["rows"]}
    colour = rows["base"]["per_attribute"]["color"]["mean"]
    found = {}
    for name, row in rows.items():
        match = re.fullmatch(r"p(\d+)-t0", name)
        if match:
            found[match.group(1)] = {"gain": row["vs"]["base"]["overall"]["mean_diff"],
                                     "colour_change": row["per_attribute"]["color"]["mean"] - colour}
    return found


def training_end(run: Path, steps: int = 100) -> Dict[str, float]:
    """A DPO run's metrics.jsonl averaged over its log lines of the last `steps` steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] > rows[-1]["step"] - steps]
    mean = lambda key: float(np.mean([r[key] for r in last]))  # noqa: E731
    return {"implicit_acc": mean("implicit_acc"), "winner_error_above_reference": mean("mse_w") - mean("ref_mse_w"),
            "loser_error_above_reference": mean("mse_l") - mean("ref_mse_l")}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs-root", type=Path, default=Path("runs/dpo-pair-sets"),
                   help="holds pairs-<seed>/pairs.parquet and the runs p<seed>-t<seed>/, as "
                   "benchmarks/dpo_pair_sets_toy_runs.sh writes them")
    p.add_argument("--table", type=Path, default=None, help="that script's table JSON (the gains to show beside)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    found = sorted(args.pairs_root.glob("pairs-*/pairs.parquet"), key=lambda f: int(f.parent.name.split("-")[1]))
    if not found:
        sys.exit(f"error: no pairs-<seed>/pairs.parquet under {args.pairs_root}: run "
                 "benchmarks/dpo_pair_sets_toy_runs.sh first, or name its folder with --pairs-root")
    gains = _gains(args.table)
    result = {f.parent.name.split("-")[1]: {**pair_set_stats(f), **gains.get(f.parent.name.split("-")[1], {})}
              for f in tqdm(found, desc="judge pair sets", unit="set", file=sys.stderr)}
    print("pair seed | gain | colour change | winner / loser judge | net signal: " + " / ".join(ATTRIBUTES))
    for seed, s in result.items():
        nets = " / ".join(f"{s['per_attribute'][a]['net']:+.3f}" for a in ATTRIBUTES)
        gain = f"{s['gain']:+.3f} | {s['colour_change']:+.3f}" if "gain" in s else "- | -"
        print(f"{seed} | {gain} | {s['winner_score']:.3f} / {s['loser_score']:.3f} | {nets}")
    errors = [a["net_standard_error"] for s in result.values() for a in s["per_attribute"].values()]
    print(f"standard error of one set's net signal: {min(errors):.3f} to {max(errors):.3f}")
    runs = {r.name: training_end(r) for r in sorted(args.pairs_root.glob("p*-t*")) if (r / "metrics.jsonl").is_file()}
    if runs:
        print("run | implicit acc | winner / loser error above the reference (last 100 steps)")
    for name, end in runs.items():
        print(f"{name} | {end['implicit_acc']:.3f} | {end['winner_error_above_reference']:+.4f} / "
              f"{end['loser_error_above_reference']:+.4f}")
    if args.out is not None:
        write_json_atomic(args.out, {"pair_sets": result, "runs": runs})


if __name__ == "__main__":
    main()
