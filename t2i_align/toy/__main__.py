"""`python -m t2i_align.toy build | where | evaluate | pairs | captions | demo`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .scenes import PAIR_SEED


def _pipe(args):
    from ..sampling import load_pipeline
    from .assets import verify_assets

    if args.model == "toy":
        verify_assets()
    return load_pipeline(args.model, lora=args.lora, text_encoding=args.text_encoding)


def _check_build_out(out: Path, tiny: bool, only: Optional[str]) -> None:
    """build replaces --out whole: refuse a folder that holds anything but toy assets, and test-quality (--tiny)
    models over the shipped ones."""
    from ..errors import UserError
    from .assets import ASSETS_DIR, MANIFEST, read_manifest, verify_assets

    if tiny and out.resolve() == ASSETS_DIR.resolve():
        raise UserError("--tiny builds test-quality models: give --out FOLDER so the shipped toy assets are kept")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise UserError(f"--out {out} holds files that are not toy assets (no {MANIFEST}), which the build would "
                        "replace: give a new or empty folder, or an earlier build's")
    if only and not (out / MANIFEST).is_file():
        raise UserError(f"--only {only} keeps the other models of an earlier build, but {out} holds none: give "
                        "--out an earlier build's folder, or drop --only")
    if (out / MANIFEST).is_file():
        listed = set(read_manifest(out)["files"]) | {MANIFEST}
        others = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                        if p.is_file() and p.relative_to(out).as_posix() not in listed)
        if others:  # the build replaces the folder whole: a file of the user's in it would go too
            raise UserError(f"--out {out} holds files that are not toy assets ({', '.join(others[:3])}), which the "
                            "build would delete with the folder: move them out or give another --out")
    if only:
        from .build import KEPT

        verify_assets(out, under=KEPT[only])  # a damaged file it keeps would pass into the new manifest


def cmd_build(args) -> dict:
    from .build import TINY_BUDGET, BuildBudget, build

    from ..files import given_path

    _check_build_out(given_path(args.out, "--out"), args.tiny, args.only)
    budget = TINY_BUDGET if args.tiny else BuildBudget()
    out = build(args.out, seed=args.seed, budget=budget, log=lambda m: print(m, file=sys.stderr, flush=True),
                only=args.only)
    return {"assets": str(out), "seed": args.seed, "tiny": args.tiny, "only": args.only}


def cmd_where(args) -> dict:
    from .assets import ASSETS_DIR, clip_dir, denscore_dir, pipeline_dir

    return {"assets": str(ASSETS_DIR), "pipeline": str(pipeline_dir()), "toy_clip": str(clip_dir()),
            "toy_denscore": str(denscore_dir())}


def cmd_evaluate(args) -> dict:
    from .evaluate import evaluate, prompt_set

    result = evaluate(_pipe(args), prompt_set(args.prompts), seeds_per_prompt=args.seeds, base_seed=args.seed)
    return dict(result.summary, model=str(args.model), lora=args.lora, prompts=args.prompts,
                text_encoding=args.text_encoding)


def cmd_captions(args) -> dict:
    from .captions import export_captions
    from .evaluate import prompt_set

    from ..files import check_output_path

    check_output_path(args.out, "--out", folder=True, replaces=[Path(args.out) / "captions.parquet"],
                      overwrite=args.overwrite)
    return export_captions(args.out, prompt_set(args.prompts), per_scene=args.per_scene, caption=args.caption,
                           seed=args.seed)


def cmd_pairs(args) -> dict:
    from .evaluate import prompt_set
    from .pairs import export_pairs

    from ..files import check_output_path

    check_output_path(args.out, "--out", folder=True, replaces=[Path(args.out) / "pairs.parquet"],
                      overwrite=args.overwrite)
    scenes = prompt_set(args.prompts)[: args.num_prompts or None]
    return export_pairs(_pipe(args), scenes, args.out, images_per_prompt=args.k, base_seed=args.seed,
                        model_name=args.model_name, pairing=args.pairing)


def cmd_compare(args) -> dict:
    """Base vs tuned on the same prompts and seeds: both means with 95 % CIs, the paired win rate, p-values."""
    from .demo import tests_of
    from .evaluate import evaluate, judge_scores, prompt_set

    scenes = prompt_set(args.prompts)
    runs = {}
    # each side in its own encoding: --text-encoding segments on the base made it read what it was never trained on
    for name, model, lora, encoding in (("base", args.base, None, args.base_text_encoding),
                                        ("tuned", args.model, args.lora, args.text_encoding)):
        args.model, args.lora, args.text_encoding = model, lora, encoding
        runs[name] = evaluate(_pipe(args), scenes, seeds_per_prompt=args.seeds, base_seed=args.seed)
    tuned, base = judge_scores(runs["tuned"]), judge_scores(runs["base"])
    return {"prompts": args.prompts, "base": runs["base"].summary, "tuned": runs["tuned"].summary,
            **tests_of(tuned, base, args.seeds)}


def cmd_demo(args) -> dict:
    from ..files import given_path
    from .demo import headline, run_demo

    result = run_demo(given_path(args.out, "--out"), seeds_per_prompt=args.seeds, config=Path(args.config),
                      train_overrides=args.overrides, num_pair_prompts=args.num_pair_prompts,
                      images_per_prompt=args.k, overwrite=args.overwrite)
    print(headline(result), file=sys.stderr, flush=True)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_align.toy", description="The t2i-align toy world.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the toy models from scratch (about an hour on 2 CPU cores, its stages "
                                     "timed apart)")
    b.add_argument("--out", default=None, help="assets folder (default: the shipped one, replaced atomically)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tiny", action="store_true", help="a few steps of each stage (tests the script only)")
    b.add_argument("--only", choices=("denoiser", "denscore"), default=None,
                   help="denoiser: retrain only the UNet, keeping the other models in --out; denscore: train only "
                        "the toy Denscore (LongAlign's long-text reward), keeping the rest")
    sub.add_parser("where", help="print the paths of the shipped assets as JSON")
    for name, helptext in (("evaluate", "judge a model on a prompt set at fixed seeds"),
                           ("pairs", "sample, judge and write Pick-a-Pic-format pairs"),
                           ("compare", "judge a tuned model against the base at the same seeds")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", default="toy", help="diffusers folder (default: the shipped toy pipeline)")
        s.add_argument("--lora", default=None, help="LoRA weights (pytorch_lora_weights.safetensors or folder)")
        s.add_argument("--prompts", default="train" if name == "pairs" else "heldout",
                       choices=("heldout", "train"))
        s.add_argument("--seed", type=int, default=PAIR_SEED if name == "pairs" else 0,
                       help="base seed of the fixed per-prompt seeds" + (
                           f" (default {PAIR_SEED}: noises no evaluation at seed 0, 100000 or 1000000 draws)"
                           if name == "pairs" else ""))
        s.add_argument("--text-encoding", choices=("clip77", "segments"), default=None,
                       help="prompt encoding (default: the one recorded with the weights, else clip77)")
    for name in ("evaluate", "compare"):
        sub.choices[name].add_argument("--seeds", type=_positive, default=4, help="images per prompt")
    sub.choices["compare"].add_argument("--base", default="toy", help="the base model folder (default: toy)")
    sub.choices["compare"].add_argument("--base-text-encoding", choices=("clip77", "segments"), default=None,
                                        help="the base's prompt encoding (default: the one recorded with it, else "
                                             "clip77; --text-encoding is the tuned model's)")
    pairs = sub.choices["pairs"]
    pairs.add_argument("--out", required=True, help="output folder for pairs.parquet")
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing --out/pairs.parquet")
    pairs.add_argument("--k", type=_at_least_two, default=4, help="images per prompt (K // 2 pairs each)")
    pairs.add_argument("--num-prompts", type=_count, default=0, help="use only the first N prompts (0: all)")
    pairs.add_argument("--model-name", default="toy-base", help="written to model_0 / model_1")
    pairs.add_argument("--pairing", default="random", choices=("random", "best-worst"),
                       help="K // 2 disjoint random pairs per prompt, or the best vs the worst image")
    c = sub.add_parser("captions", help="ground-truth image-caption parquet (LongAlign stage 1 data)")
    c.add_argument("--out", required=True, help="output folder for captions.parquet")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out/captions.parquet")
    c.add_argument("--prompts", default="train", choices=("heldout", "train"))
    c.add_argument("--per-scene", type=int, default=8, help="renders per scene (position jitter differs)")
    c.add_argument("--caption", default="long", choices=("long", "short", "mixed"))
    c.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="pairs from the base model, LoRA DPO, then base vs tuned judged + a gallery")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seeds", type=_positive, default=8, help="held-out images per prompt for the comparison")
    d.add_argument("--k", type=_at_least_two, default=8,
                   help="images per training prompt; the best vs the worst is a pair")
    d.add_argument("--num-pair-prompts", type=_count, default=0,
                   help="use only the first N training prompts (0: all)")
    d.add_argument("--config", default="configs/toy/demo.yaml")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    d.add_argument("overrides", nargs="*", help="dotted overrides of the DPO config, e.g. train.max_steps=50")
    return p


def _at_least(low: int, why: str):
    """An argparse type: an integer >= `low`, else an error saying `why` (-1 prompts used to mean "all but the
    last" by slicing; 0 images per prompt ended in "generate got no prompts"; pairs need a best and a worst)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} {why}")
        return value
    parse.__name__ = "int"  # argparse's word for a value int() rejects
    return parse


_count = _at_least(0, "is negative: give 0 (all) or a number of prompts")
_positive = _at_least(1, "is too small: give a number >= 1")
_at_least_two = _at_least(2, "is too small: pairs need at least 2 images per prompt")


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import run_cli

    args = _parser().parse_args(argv)
    if args.command == "build" and args.out is None:
        from .assets import ASSETS_DIR
        args.out = ASSETS_DIR
    commands = {"build": cmd_build, "where": cmd_where, "evaluate": cmd_evaluate, "pairs": cmd_pairs,
                "compare": cmd_compare, "demo": cmd_demo, "captions": cmd_captions}

    def run() -> int:
        print(json.dumps(commands[args.command](args), indent=2, default=str))
        return 0

    # ValueError too: toy/pairs.py and toy/build.py still raise it for bad --k / --only arguments.
    return run_cli(run, also=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
