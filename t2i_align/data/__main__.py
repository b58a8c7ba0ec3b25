r"""python -m t2i_align.data pairs | captions: your own data, image files listed in a JSONL or CSV file, as the
parquet the loop reads; relabel: pairs labelled by a reward model instead of people (AI feedback).

  python -m t2i_align.data pairs --from my_pairs.jsonl --out data/mine     # then data.path=data/mine/pairs.parquet
  python -m t2i_align.data captions --from long.jsonl --out data/long      # data.kind=captions (LongAlign stage 1)
  python -m t2i_align.data relabel --pairs data/pickapic --reward pickscore --option pickscore.model_dir=/w/PS \
      --option pickscore.processor_dir=/w/clip-h --device cuda --out data/pickapic-ps   # data.path=data/pickapic-ps

pairs: each JSONL object or CSV row has caption (or prompt), and image_w + image_l (winner, loser) or image_0 +
image_1 + label_0 (1: image_0 preferred, 0: image_1, 0.5: tie); optional user_id (PPD), model_0, model_1.
captions: caption (or prompt) and image. Image paths are relative to --image-root (default: the listing's
folder) and must stay inside it. Unusable rows are skipped and counted (the counts are printed as JSON and saved
beside the parquet).
relabel: every pair scored by --reward (any t2i-score reward), label_0 = which image scored higher, the human
label kept as human_label_0 (see t2i_align/data/relabel.py); only the pairs people decided, as the official
Diffusion-DPO code, unless --all-pairs. OUT/relabel.json: counts and the agreement with the human labels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import UserError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_align.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for kind, what in (("pairs", "image pairs"), ("captions", "captioned images")):
        s = sub.add_parser(kind, help=f"a JSONL or CSV listing of {what} to OUT/{kind}.parquet")
        s.add_argument("--from", dest="listing", required=True, help="the .jsonl or .csv listing")
        s.add_argument("--out", required=True, help=f"output folder for {kind}.parquet and {kind}.json")
        s.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the "
                                                          "listing's folder); no image may resolve outside it")
        s.add_argument("--row-group-size", type=int, default=500,
                       help="rows per parquet row group (the streaming reader's unit; 100-1,000 suit large data)")
        s.add_argument("--overwrite", action="store_true", help=f"replace an existing OUT/{kind}.parquet, or write "
                       "beside other parquet files in OUT (training reads them all as one data set)")
    _relabel_parser(sub)
    return p


def _relabel_parser(sub) -> None:
    s = sub.add_parser("relabel", help="Pick-a-Pic-format pairs labelled by a reward model, to OUT/")
    s.add_argument("--pairs", required=True, help="a Pick-a-Pic-format parquet file or folder of them")
    s.add_argument("--reward", required=True, help="the reward that decides (a t2i-score name: pickscore, hpsv2 ...)")
    s.add_argument("--option", action="append", metavar="NAME.KEY=VALUE", help="reward option, as in t2i-score")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the reward's)")
    s.add_argument("--batch-size", type=int, default=32, help="pairs read and scored at a time (default 32)")
    s.add_argument("--all-pairs", action="store_true", help="relabel the pairs people called a tie or left "
                   "unlabelled (or with an invalid label_0) too (the official code trains only on the pairs people "
                   "decided)")
    s.add_argument("--out", required=True, help="output folder: one relabelled file per input file, relabel.json")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep the files an earlier run finished in OUT")
    group.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in OUT")


def _relabel(args) -> int:
    from reward_models.cli import UsageError, load_rewards, parse_options

    from ..files import check_output_path, given_path
    from .relabel import check_no_strays, input_files, relabel, remove_outputs

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    given_path(args.pairs, "--pairs")  # "" would be the working directory
    if not Path(args.pairs).exists():
        raise UsageError(f"--pairs {args.pairs} does not exist: give a Pick-a-Pic-format parquet file or folder")
    try:
        files = input_files(Path(args.pairs))
    except (OSError, ValueError) as err:  # ConfigError: no parquet files, a file outside the folder
        raise UsageError(f"--pairs {args.pairs}: {err}") from None
    out = given_path(args.out, "--out")
    earlier = [out / name for name, _ in files] + [out / "relabel.json"]
    _check_unfinished(out, [name for name, _ in files], args)
    check_output_path(out, "--out", folder=True, inputs={"--pairs": args.pairs},
                      replaces=[] if args.resume else earlier, overwrite=args.overwrite)
    check_no_strays(out, [name for name, _ in files])
    name = args.reward.strip()
    options = parse_options(args.option or [], [name])
    reward = load_rewards([name], options, args.device)[name]
    made = not out.exists()
    try:
        summary = relabel(Path(args.pairs), out, name, reward, {"reward": name, "options": options[name]},
                          resume=args.resume, rows_per_read=args.batch_size, all_pairs=args.all_pairs,
                          log=lambda message: print(message, file=sys.stderr))
    except KeyboardInterrupt:  # run_cli prints it after "stopped (Ctrl-C)"
        raise KeyboardInterrupt(f"The same command with --resume keeps the files finished in {out}") from None
    print(json.dumps(summary, indent=2))
    if not summary["written"]:  # empty files: a run given OUT would find no pairs; removed, so a rerun may write
        remove_outputs(out, [name for name, _ in files], made)
        skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items() if v)
        why = f"; the first not scored: {summary['first_problem']}" if "first_problem" in summary else ""
        undecided = sum(summary["skipped"][k] for k in ("human_tie", "unlabelled", "invalid_label"))
        hint = "" if not undecided or args.all_pairs else (
            "; add --all-pairs to relabel the pairs people did not decide (ties, unlabelled, invalid labels)"
            if undecided == summary["rows"] else  # else the reward's failures on the others come first
            f"; --all-pairs would add the {undecided} pairs people did not decide, if the reward scores them")
        raise UsageError(f"no pair was relabelled: of {summary['rows']} rows read, skipped {skipped or 'none'}{why} "
                         f"(its files in {out} removed){hint}")
    return 0


def _check_unfinished(out: Path, names: List[str], args) -> None:
    """A stopped relabelling (files finished, no relabel.json) is finished by --resume: the "exists ... pass
    --overwrite" that check_output_path says would redo the finished files (GPU-hours at Pick-a-Pic's size)."""
    from reward_models.cli import UsageError

    from .relabel import record_path

    done = sum(record_path(out / name).is_file() for name in names)
    if done and not (out / "relabel.json").is_file() and not (args.resume or args.overwrite):
        raise UsageError(f"{out} holds a stopped relabelling ({done} of {len(names)} files finished): pass --resume "
                         "to finish it (the finished files are kept), or --overwrite to start over")


def _import(args) -> int:
    from ..files import check_output_path, given_path
    from .listings import import_listing

    listing, out = given_path(args.listing, "--from"), given_path(args.out, "--out")
    if listing.is_dir():
        raise UserError(f"--from {listing} is a folder: give the .jsonl or .csv listing in it (one row per "
                        f"{'pair' if args.command == 'pairs' else 'image'}; its image paths relative to --image-root)")
    if not listing.is_file():
        raise UserError(f"--from {listing}: no such file")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise UserError(f"--image-root {args.image_root}: no such folder")
    if args.row_group_size < 1:
        raise UserError(f"--row-group-size must be >= 1, got {args.row_group_size}")
    earlier = [out / f"{args.command}.{ext}" for ext in ("parquet", "json")]
    check_output_path(out, "--out", folder=True, replaces=earlier, overwrite=args.overwrite)
    _check_no_other_data(out, args.command, args.overwrite)
    made = not out.exists()
    try:
        counts = import_listing(args.command, listing, out, args.image_root and Path(args.image_root),
                                args.row_group_size, log=lambda message: print(message, file=sys.stderr))
    except BaseException:  # no usable row, Ctrl-C ...: the folder this import made is not left behind empty
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    print(json.dumps(counts, indent=2))
    return 0


def _check_no_other_data(out: Path, kind: str, overwrite: bool) -> None:
    """Training reads every parquet file of a folder as one data set: OUT/pairs.parquet written beside another
    data set's files was trained on merged with them, unasked."""
    from ..files import browser_leftover

    others = sorted(f.name for f in out.glob("*.parquet") if f.name != f"{kind}.parquet"
                    and not browser_leftover(f.name)) if out.is_dir() else []
    if others and not overwrite:
        raise UserError(f"--out {out} already holds {len(others)} other parquet file(s) ({', '.join(others[:3])}), "
                        f"which training would read merged with {kind}.parquet as one data set: choose an empty "
                        "--out folder, or pass --overwrite to write beside them anyway")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: _relabel(args) if args.command == "relabel" else _import(args))


if __name__ == "__main__":
    sys.exit(main())
