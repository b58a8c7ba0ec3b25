"""python -m t2i_align.data pairs | captions: your own data, image files listed in a JSONL or CSV file, as the
parquet the loop reads.

  python -m t2i_align.data pairs --from my_pairs.jsonl --out data/mine     # then data.path=data/mine/pairs.parquet
  python -m t2i_align.data captions --from long.jsonl --out data/long      # data.kind=captions (LongAlign stage 1)

pairs: each JSONL object or CSV row has caption (or prompt), and image_w + image_l (winner, loser) or image_0 +
image_1 + label_0 (1: image_0 preferred, 0: image_1, 0.5: tie); optional user_id (PPD), model_0, model_1.
captions: caption (or prompt) and image. Image paths are relative to --image-root (default: the listing's
folder) and must stay inside it. Unusable rows are skipped and counted (the counts are printed as JSON and saved
beside the parquet).
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
        s.add_argument("--overwrite", action="store_true", help=f"replace an existing OUT/{kind}.parquet")
    return p


def _import(args) -> int:
    from ..files import check_output_path
    from .listings import import_listing

    listing, out = Path(args.listing), Path(args.out)
    if not listing.is_file():
        raise UserError(f"--from {listing}: no such file")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise UserError(f"--image-root {args.image_root}: no such folder")
    if args.row_group_size < 1:
        raise UserError(f"--row-group-size must be >= 1, got {args.row_group_size}")
    earlier = [out / f"{args.command}.{ext}" for ext in ("parquet", "json")]
    check_output_path(out, "--out", folder=True, replaces=earlier, overwrite=args.overwrite)
    counts = import_listing(args.command, listing, out, args.image_root and Path(args.image_root),
                            args.row_group_size, log=lambda message: print(message, file=sys.stderr))
    print(json.dumps(counts, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: _import(args))


if __name__ == "__main__":
    sys.exit(main())
