"""A method's toy-world table: each model judged on the 60 held-out prompts × 8 seeds, per attribute, with its
sample diversity, against each baseline (win rate + sign-test p, paired difference + t-test p, and the paired
difference of every attribute's accuracy with its t-test p).

    python benchmarks/toy_table.py --model sft=runs/toy-sft-600/final --model seppo=runs/toy-seppo-600/final \
        --baseline base --baseline sft --seed 0 --out runs/seppo-table-seed0.json

`base` is the shipped toy model (no LoRA). A model's per-image verdicts are cached under --cache (keyed by the
LoRA file's content and the seed), so a baseline is sampled once for every table it appears in. Settings are the
toy evaluation's (DDIM 20 steps, guidance 3, `t2i_align.toy.evaluate`); diversity is the RAFT metric per prompt
(mean pairwise RMS distance of its 8 seeds' final latents), averaged over prompts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from t2i_align.files import write_json_atomic
from t2i_align.ranking import diversity
from t2i_align.sampling import load_pipeline
from t2i_align.stats import mean_ci, paired_diff, win_rate
from t2i_align.toy.evaluate import evaluate, prompt_set
from t2i_align.toy.scenes import ATTRIBUTES

SEEDS_PER_PROMPT = 8


def _lora_file(path: str) -> Path:
    p = Path(path)
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p


def _cache_name(lora: str, seed: int) -> str:
    digest = "base" if lora == "base" else hashlib.sha256(_lora_file(lora).read_bytes()).hexdigest()[:16]
    return f"{digest}-seed{seed}.npz"


def judged(lora: str, seed: int, cache: Path) -> Dict[str, np.ndarray]:
    """correct: [images, attributes] 0/1; score: [images]; diversity: [prompts]. Cached by LoRA content and seed."""
    path = cache / _cache_name(lora, seed)
    if path.exists():
        return dict(np.load(path))
    pipe = load_pipeline("toy", lora=None if lora == "base" else lora)
    if lora != "base":
        pipe.fuse_lora()  # same images to ~1e-5 as unfused adapters, faster on CPU
    scenes = prompt_set("heldout")
    ev = evaluate(pipe, scenes, seeds_per_prompt=SEEDS_PER_PROMPT, base_seed=seed)
    k = SEEDS_PER_PROMPT
    out = {"correct": np.array([[float(v.correct[a]) for a in ATTRIBUTES] for v in ev.verdicts]),
           "score": np.array([v.score for v in ev.verdicts]),
           "diversity": np.array([diversity(ev.samples.latents[i * k:(i + 1) * k]) for i in range(len(scenes))])}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def row(name: str, r: Dict[str, np.ndarray], baselines: Dict[str, Dict[str, np.ndarray]]) -> Dict:
    out = {"model": name, "overall": mean_ci(r["score"]), "diversity": mean_ci(r["diversity"]),
           "per_attribute": {a: mean_ci(r["correct"][:, i]) for i, a in enumerate(ATTRIBUTES)}, "vs": {}}
    for bname, b in baselines.items():
        if bname == name:
            continue
        out["vs"][bname] = {
            "win_rate": win_rate(r["score"], b["score"]), "paired_diff": paired_diff(r["score"], b["score"]),
            "diversity_diff": paired_diff(r["diversity"], b["diversity"]),
            "per_attribute": {a: paired_diff(r["correct"][:, i], b["correct"][:, i])
                              for i, a in enumerate(ATTRIBUTES)}}
    return out


def markdown(rows: List[Dict]) -> str:
    head = "| model | judge | " + " | ".join(ATTRIBUTES) + " | diversity | vs | win rate | p sign | p t | " \
           "attribute changes (p t < 0.01) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        attrs = " | ".join(f"{r['per_attribute'][a]['mean']:.3f}" for a in ATTRIBUTES)
        first = (f"| {r['model']} | {r['overall']['mean']:.3f} [{r['overall']['low']:.3f}, "
                 f"{r['overall']['high']:.3f}] | {attrs} | {r['diversity']['mean']:.4f} |")
        if not r["vs"]:
            lines.append(first + " | | | | |")
        for i, (bname, v) in enumerate(r["vs"].items()):
            sig = [f"{a} {d['mean_diff']:+.3f}" for a, d in v["per_attribute"].items() if d["p_value"] < 0.01]
            cells = (f" {bname} | {v['win_rate']['win_rate']:.3f} | {v['win_rate']['p_value']:.2g} | "
                     f"{v['paired_diff']['p_value']:.2g} | {', '.join(sig) or '—'} |")
            lines.append((first if i == 0 else "| | | " + " | " * len(ATTRIBUTES) + " |") + cells)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=LORA",
                   help="a model to judge: a name and its LoRA (folder or file); repeatable")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME",
                   help="compare every model with this one (base, or a --model name); repeatable")
    p.add_argument("--seed", type=int, default=0, help="base seed (image k of prompt i: seed + 10000k + i)")
    p.add_argument("--cache", type=Path, default=Path("runs/toy-table-cache"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    models = {"base": "base"}
    for spec in args.model:
        name, sep, lora = spec.partition("=")
        if not sep or not name or not _lora_file(lora).is_file():
            p.error(f"--model {spec!r}: expected NAME=LORA with an existing LoRA folder or file")
        models[name] = lora
    for b in args.baseline:
        if b not in models:
            p.error(f"--baseline {b!r} is neither base nor a --model name")
    results = {name: judged(lora, args.seed, args.cache) for name, lora in models.items()}
    rows = [row(name, r, {b: results[b] for b in args.baseline}) for name, r in results.items()]
    write_json_atomic(args.out, {"seed": args.seed, "seeds_per_prompt": SEEDS_PER_PROMPT, "models": models,
                                 "rows": rows})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
