"""python -m t2i_align.users embed | check-shots: PPD's stage 1 (user embeddings) and the shots-vs-training check.

  accelerate launch -m t2i_align.users embed --model LLAVA_DIR --pairs PAIRS --out OUT [--num-shots 4]
  python -m t2i_align.users check-shots --shots OUT/users.json --pairs TRAIN_PAIRS
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import UserError, run_cli
from .llava import NUM_SHOTS_SUPPORTED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_align.users", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embed every user of a pair set with LLaVA-OneVision (PPD stage 1)")
    e.add_argument("--model", required=True, help="local LLaVA-OneVision folder in transformers' format")
    e.add_argument("--pairs", required=True, help="Pick-a-Pic-format parquet file or folder with user_id")
    e.add_argument("--out", required=True, help="output folder (parts/, user_table.safetensors, users.json)")
    e.add_argument("--num-shots", type=int, default=4, choices=NUM_SHOTS_SUPPORTED)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-new-tokens", type=int, default=1024)
    e.add_argument("--max-users", type=int, default=0, help="only the first N users (0: all)")
    e.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    e.add_argument("--overwrite", action="store_true", help="replace a user table in --out that no run's parts/ "
                   "is beside")
    c = sub.add_parser("check-shots", help="fail if a user's shot is among that user's training pairs")
    c.add_argument("--shots", required=True, help="users.json written by embed")
    c.add_argument("--pairs", required=True, help="the training pairs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # ValueError / OSError: a malformed pair file, a folder that is not LLaVA; embed's processes are stopped
    # together by the launcher (its parts are written whole), so a kill need not be an exception there
    return run_cli(lambda: _run(args), also=(ValueError, OSError), sigterm=args.command != "embed")


def _check_llava_folder(folder: Path) -> None:
    """Its config.json names LLaVA-OneVision, before every process loads it (transformers' own error for another
    model points to the hub, which this machine may not reach)."""
    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--model {folder} has no readable config.json: pass a LLaVA-OneVision folder in "
                        "transformers' format (e.g. llava-hf/llava-onevision-qwen2-7b-ov-chat-hf)") from None
    if kind != "llava_onevision":
        raise UserError(f"--model {folder} is a {kind!r} model (its config.json), not LLaVA-OneVision "
                        "(model_type llava_onevision), whose user embeddings PPD was trained with: pass such a folder "
                        "(e.g. llava-hf/llava-onevision-qwen2-7b-ov-chat-hf)")


def _run(args: argparse.Namespace) -> int:
    from . import embed

    if args.command == "embed":
        if args.max_users < 0:  # users[:-1] would drop the last user without a word
            raise UserError(f"--max-users {args.max_users}: give a number >= 0 (0: every user)")
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model} is not a folder; pass a local LLaVA-OneVision "
                                    "checkpoint in transformers' format (nothing is downloaded)")
        _check_llava_folder(Path(args.model))
        embed.check_out(Path(args.out), args.overwrite)
        summary = embed.run_embed(args.model, args.pairs, args.out, args.num_shots, args.seed,
                                  args.max_new_tokens, args.max_users, args.dtype)
        if summary and summary["failed"]:  # the table lacks them: a script must be able to tell
            return 1
    else:
        rows = embed.check_shots(args.shots, args.pairs)
        print(json.dumps({"rows_of_embedded_users_checked": rows, "overlaps": 0}))
        if rows == 0:  # new users (no training pairs) are disjoint by construction; say so, not "checked"
            print(f"note: no pair of {args.pairs} belongs to a user of {args.shots}: nothing to compare (users "
                  "new to this training set?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
