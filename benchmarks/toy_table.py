"""A method's toy-world table: each model judged on the 60 held-out prompts × 8 seeds, per attribute, with its
sample diversity, against each baseline (the image win rate; with the prompt as the unit, since a prompt's 8 seeds
are not independent: the sign-test and t-test p of the per-prompt mean differences, and every attribute's paired
difference with its per-prompt t-test p; `stats.clustered_diff`).

    python benchmarks/toy_table.py --model sft=runs/toy-sft-600/final --model seppo=runs/toy-seppo-600/final \
        --baseline base --baseline sft --seed 0 --out runs/seppo-table-seed0.json

`base` is the shipped toy model (no LoRA). Each model is judged by `t2i_align.toy.long_eval.judge_records` on the
short captions (the toy evaluation's DDIM 20 steps, guidance 3; diversity = the RAFT metric per prompt, mean
pairwise RMS distance of its 8 seeds' final latents) and compared by its `compare_records`; a model's record is
cached under --cache (keyed by the LoRA file's content and the seed), so a baseline is sampled once for every
table it appears in.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, List

from tqdm.auto import tqdm

from t2i_align.files import write_json_atomic
from t2i_align.sampling import load_pipeline
from t2i_align.stats import win_rate
from t2i_align.toy.evaluate import prompt_set
from t2i_align.toy.long_eval import compare_records, judge_records, summarize_record
from t2i_align.toy.scenes import ATTRIBUTES

SEEDS_PER_PROMPT = 8


def _lora_file(path: str) -> Path:
    p = Path(path)
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p


def _cache_name(lora: str, seed: int) -> str:
    """Keyed by what makes and scores the images: the toy base's UNet (a rebuilt base makes other ones), the LoRA
    and the text encoding recorded beside it, the seed, the sampling steps and guidance, and the judge's code (a
    record cached before a change there would be compared with ones made after it)."""
    import t2i_align.toy.judge as judge
    import t2i_align.toy.scenes as scenes
    from t2i_align.conditioning.text import TEXT_ENCODING_FILE
    from t2i_align.toy.assets import pipeline_dir
    from t2i_align.toy.evaluate import TOY_GUIDANCE, TOY_STEPS

    h = hashlib.sha256((pipeline_dir() / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    h.update(f"{TOY_STEPS} {TOY_GUIDANCE}".encode())
    for code in (judge, scenes):  # the judge and the captions it parses
        h.update(Path(code.__file__).read_bytes())
    if lora != "base":
        h.update(_lora_file(lora).read_bytes())
        encoding = _lora_file(lora).parent / TEXT_ENCODING_FILE
        h.update(encoding.read_bytes() if encoding.is_file() else b"")
    return f"{'base-' if lora == 'base' else ''}{h.hexdigest()[:16]}-seed{seed}.json"


def judged(lora: str, seed: int, cache: Path) -> Dict:
    """The model's `judge_records` record on the held-out short captions; cached by LoRA content and seed."""
    path = cache / _cache_name(lora, seed)
    if path.exists():
        return json.loads(path.read_text())
    pipe = load_pipeline("toy", lora=None if lora == "base" else lora)
    if lora != "base":
        pipe.fuse_lora()  # same images to ~1e-5 as unfused adapters, faster on CPU
    total = len(prompt_set("heldout")) * SEEDS_PER_PROMPT
    with tqdm(total=total, desc=f"judge {lora} (seed {seed})", unit="img", file=sys.stderr) as bar:
        record = judge_records(pipe, "heldout", "short", SEEDS_PER_PROMPT, seed, batch_size=128, progress=bar.update)
    write_json_atomic(path, record)
    return record


def row(name: str, r: Dict, baselines: Dict[str, Dict]) -> Dict:
    out = {"model": name, **summarize_record(r), "vs": {}}
    for bname, b in baselines.items():
        if bname != name:
            out["vs"][bname] = {"win_rate": win_rate(r["score"], b["score"]), **compare_records(r, b)}
    return out


def markdown(rows: List[Dict]) -> str:
    head = "| model | judge | " + " | ".join(ATTRIBUTES) + " | diversity | vs | win rate (images) | " \
           "p sign (prompts) | p t (prompts) | attribute changes (p t per prompt < 0.01, not Holm-adjusted) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        attrs = " | ".join(f"{r['per_attribute'][a]['mean']:.3f}" for a in ATTRIBUTES)
        first = (f"| {r['model']} | {r['overall']['mean']:.3f} [{r['overall']['low']:.3f}, "
                 f"{r['overall']['high']:.3f}] | {attrs} | {r['diversity']['mean']:.4f} |")
        if not r["vs"]:
            lines.append(first + " | | | | |")
        for i, (bname, v) in enumerate(r["vs"].items()):
            sig = [f"{a} {v[a]['mean_diff']:+.3f}" for a in ATTRIBUTES if v[a]["per_prompt"]["p_value"] < 0.01]
            prompts = v["overall"]["per_prompt"]
            cells = (f" {bname} | {v['win_rate']['win_rate']:.3f} | {prompts['sign']['p_value']:.2g} | "
                     f"{prompts['p_value']:.2g} | {', '.join(sig) or '—'} |")
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
        if name in models:  # a second one replaced the first (base too) without a word
            p.error(f"--model {spec!r}: the name {name!r} is taken ({'the base model' if name == 'base' else 'twice'});"
                    " give each model its own name")
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
