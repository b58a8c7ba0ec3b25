"""`t2i-score`: score images with rewards, decoded once per batch for every reward (`score_items`, also timed).

FOLDER: image files (png/jpg/jpeg/webp/bmp, not recursive; all must resolve inside FOLDER) with prompts from
  --prompts FILE.txt (one per line, empty = empty prompt; or FILE.json, a list) matched to the files in name order,
  numbers by value (2.png before 10.png): counts must match; --prompts FILE.jsonl|FILE.csv (`file` relative to
  FOLDER, `prompt`: those files are scored); or without --prompts FOLDER/metadata.jsonl ({"file": ..., "prompt":
  ...} lines, as sample/generate.py and a gallery's images/ hold).
PARQUET (Pick-a-Pic; a file or a folder of *.parquet): jpg_0 and jpg_1 of each row with its `caption`, one output
  row per image (parquet, row, side, label_0, label_problem). --pairwise: each reward's preference accuracy vs
  label_0 with a 95% Wilson interval; label ties (0.5), unlabelled pairs, invalid labels (outside [0, 1], NaN: as
  training skips them) and pairs with an unscored side are excluded and counted; equal reward scores count half.
OUTPUT: .jsonl or .csv, written atomically. An unreadable image (or parquet row group), a bad row of the .jsonl /
  .csv (no file, not JSON, a prompt that is not text, a torn CSV row) or a prompt a reward rejects gets null
  scores and an `error`, the rest are scored. stdout: summary JSON (per reward mean, std, n, summed info counts
  such as `truncated` prompts; `pairwise`). Progress on stderr (terminals only).
--option NAME.KEY=VALUE (repeatable; int/float/true/false/none parsed, not for text or path options), e.g.
  --option clip.arch=ViT-B-32 --option hpsv2.checkpoint=/w/HPS_v2.1_compressed.pt --option clip.dtype=bf16
  --option clip.batch_size=8 (a reward may split each batch further). --device goes to every reward that takes one;
  --tf32 (CUDA) speeds up their fp32 matrix products at TF32's rounding.
Exit code 2 and `error: ...` for user errors: unknown reward/option, bad syntax, missing weights (names the file
  expected and its source), missing parquet columns, --pairwise with no usable label_0 (text such as "1" or
  "tie", all unlabelled or tied), prompt count mismatch. Exit code 1 when a reward scored no
  image (the rows, with each image's error, are written first).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import itertools
import json
import math
import os
import re
import statistics
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from tqdm import tqdm

from t2i_align.data.images import DECODE_ERRORS
from t2i_align.errors import run_cli
from t2i_align.files import check_output_path, given_path, synced, temp_file
from t2i_align.stats import wilson_interval

from .base import _REGISTRY, Reward, WeightsNotFoundError, available_rewards
from .options import check_reward
from .inputs import IMAGE_SUFFIXES, BadRow, Item, UsageError, folder_items, parquet_items  # noqa: F401 (importers)


def parse_value(text: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return {"true": True, "false": False, "none": None, "null": None}.get(text.strip().lower(), text)


def typed_value(name: str, key: str, text: str) -> Any:
    """`parse_value`, but text stays text for an option typed as text or a path (`clip.checkpoint=2024`,
    `hpsv2.version=2.1`): numbers are parsed only where the reward's constructor can take one; `~` is expanded."""
    value = parse_value(text)
    if isinstance(value, str) and value.startswith("~"):  # the shell leaves `clip.checkpoint=~/w.pt` as it is
        return os.path.expanduser(value)
    if not isinstance(value, (bool, int, float)) or name not in available_rewards():
        return value
    try:
        hint = str(typing.get_type_hints(_REGISTRY[name].__init__).get(key, ""))
    except (NameError, TypeError):  # an annotation that does not resolve: parsed as before
        return value
    textual = re.search(r"\bstr\b|Path", hint) and not re.search(r"\b(bool|int|float)\b", hint)
    return text if textual else value


def parse_options(specs: Iterable[str], names: List[str]) -> Dict[str, Dict[str, Any]]:
    options: Dict[str, Dict[str, Any]] = {n: {} for n in names}
    for spec in specs:
        m = re.fullmatch(r"([^.=\s]+)\.([A-Za-z_]\w*)=(.*)", spec, re.S)
        if m is None:
            raise UsageError(f"bad --option {spec!r}: expected NAME.KEY=VALUE, e.g. clip.arch=ViT-B-32")
        name, key, value = m.groups()
        if name not in options:
            raise UsageError(f"--option {spec!r} is for reward {name!r}, which is not in --reward {','.join(names)}")
        options[name][key] = typed_value(name, key, value)
    return options


def load_rewards(names: List[str], options: Dict[str, Dict[str, Any]], device: Optional[str]) -> Dict[str, Reward]:
    """Check names and option keys against the constructors, then build (WeightsNotFoundError may escape). A
    reward scoring against its batch (decomposed-clip's direction=batch) is refused: no command here batches
    images by prompt."""
    available = available_rewards()
    if not names or len(set(names)) != len(names) or not set(names) <= set(available):
        raise UsageError(f"bad --reward {','.join(names)!r} (unknown or repeated); available: {', '.join(available)}")
    for name in names:  # every reward's options and weight paths, before any weights load (minutes for CLIP-H)
        try:
            check_reward(name, options[name])
        except WeightsNotFoundError as e:
            raise _how_given(e, name) from e
        except ValueError as e:
            raise UsageError(str(e)) from e
        if str(options[name].get("direction")) == "batch":
            raise UsageError(f"{name} with direction=batch scores each image against its batch's mean text, so a "
                             "score would depend on the images beside it and on --batch-size (a batch of one prompt "
                             f"decomposes nothing); fit the direction once instead: --option {name}.fit_prompts=FILE "
                             "(or direction=FILE)")
    rewards = {}
    for name in names:
        params = inspect.signature(_REGISTRY[name]).parameters
        any_key = any(p.kind is p.VAR_KEYWORD for p in params.values())
        take_device = device is not None and ("device" in params or any_key)
        opts = {**({"device": device} if take_device else {}), **options[name]}
        try:
            rewards[name] = _REGISTRY[name](**opts)
        except ValueError as e:  # bad option values (unknown arch, dtype, version ...)
            raise UsageError(f"reward {name!r}: {e}") from e
        except WeightsNotFoundError as e:
            raise _how_given(e, name) from e
    return rewards


def _how_given(err: Exception, name: str) -> WeightsNotFoundError:
    """The error, saying how this command takes the option that names the weights."""
    return WeightsNotFoundError(f"{err} (t2i-score takes an option KEY=VALUE as --option {name}.KEY=VALUE)")


def score_items(rewards: Dict[str, Reward], items: Iterable[Item], batch_size: int = 32, on_batch=lambda b: None,
                rows: Optional[List[dict]] = None):
    """Decode and score `batch_size` items at a time with every reward -> (rows, summed info counts per reward).
    `rows` (given): the list the rows of each finished batch are appended to, kept by a caller when a later batch
    fails."""
    rows, counts, it = [] if rows is None else rows, {name: {} for name in rewards}, iter(items)
    alone = {name: 0 for name in rewards}  # images in a row that failed one at a time (batches of one)
    while batch := list(itertools.islice(it, max(1, batch_size))):
        images, ok, done = [], [], []
        for item in batch:
            row = {**item.key, "prompt": item.prompt, **{name: None for name in rewards}}
            try:
                images.append(item.decode())
                ok.append(row)
            except BadRow as e:
                row["error"] = str(e)
            except DECODE_ERRORS as e:  # OSError covers a missing file
                row["error"] = f"unreadable image: {type(e).__name__}: {e}"
            done.append(row)
        for name, reward in rewards.items():
            failed = _apply(name, reward, images, [r["prompt"] for r in ok], ok, counts[name])
            alone[name] = alone[name] + 1 if isinstance(failed, RuntimeError) else 0
            if alone[name] >= LONE_FAILURES:  # with --batch-size 1 no batch shows that every image fails
                raise failed
        rows.extend(done)
        on_batch(batch)
    return rows, counts


LONE_FAILURES = 8
"""Batches of one image that fail in a row with a RuntimeError before the run stops: the model's error."""


def _apply(name: str, reward: Reward, images: list, prompts: List[str], rows: List[dict], counts: dict
           ) -> Optional[Exception]:
    """Scores into `rows`; on a ValueError (toy-judge: not a toy caption) or another RuntimeError than running out
    of memory (an image a model cannot take, e.g. a 1000 x 2 banner) retry one by one and flag the culprits. A
    RuntimeError that every image of the batch meets again alone (a device-side assert, a dtype mismatch) is the
    model's, not an image's: raised, not flagged on every row of the run. Returns the error of a lone image it
    flagged (the caller counts those in a row: a batch of one cannot tell)."""
    import torch

    try:
        scores, info = reward(images, prompts)
    except torch.OutOfMemoryError:
        raise  # the batch, not an image: --batch-size is the remedy
    except (ValueError, RuntimeError) as e:
        if len(images) == 1:
            rows[0]["error"] = "; ".join(filter(None, [rows[0].get("error"), f"{name}: {e}"]))
            return e
        for i in range(len(images)):
            _apply(name, reward, images[i:i + 1], prompts[i:i + 1], rows[i:i + 1], counts)
        if not isinstance(e, ValueError) and all(row[name] is None for row in rows):
            raise
        return None
    # per-batch counts such as `truncated` are summed; per-image lists are not kept
    counts.update({k: counts.get(k, 0) + v for k, v in info.items() if type(v) is int})
    for row, s in zip(rows, scores.detach().float().cpu().tolist()):
        row[name] = s if math.isfinite(s) else None
        if row[name] is None:  # said and counted as an unscored image is, not a silent null
            row["error"] = "; ".join(filter(None, [row.get("error"), f"{name}: non-finite score {s}"]))


def summarize(rows: List[dict], names: List[str], counts: Dict[str, dict]) -> Dict[str, Any]:
    vals = {name: [r[name] for r in rows if r[name] is not None] for name in names}
    return {"images": len(rows), "errors": sum("error" in r for r in rows), "rewards": {
        name: {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
               "n": len(v), **counts.get(name, {})} for name, v in vals.items()}}


def pairwise_accuracy(rows: List[dict], names: List[str]) -> Dict[str, Any]:
    """Per reward: share of labelled, non-tied pairs where the reward prefers the labelled winner."""
    pairs: Dict[Tuple[str, int], Dict[int, dict]] = {}
    for r in rows:
        pairs.setdefault((r["parquet"], r["row"]), {})[r["side"]] = r
    labels = [p[0].get("label_0") for p in pairs.values()]
    problems = [p[0].get("label_problem") for p in pairs.values()]
    labelled = [p for p in pairs.values() if p[0].get("label_0") not in (None, 0.5)]
    out: Dict[str, Any] = {"pairs": len(pairs), "label_ties_excluded": labels.count(0.5),
                           "unlabelled_excluded": problems.count("unlabelled"),
                           "invalid_labels_excluded": problems.count("invalid_labels")}
    for name in names:
        scored = [(p[0][name], p[1][name], p[0]["label_0"]) for p in labelled
                  if p[0][name] is not None and 1 in p and p[1][name] is not None]
        ties = sum(s0 == s1 for s0, s1, _ in scored)
        correct = ties / 2 + sum(s0 != s1 and (s0 > s1) == (label > 0.5) for s0, s1, label in scored)
        n = len(scored)
        low, high = wilson_interval(correct / n, n) if n else (None, None)
        out[name] = {"accuracy": correct / n if n else None, "low": low, "high": high, "n": n,
                     "reward_ties": ties, "unscored_excluded": len(labelled) - n}
    return out


def write_rows(rows: List[dict], path: Path) -> None:
    """JSONL or CSV by extension; a fresh temp file + rename so a reader never sees half a file (a fixed temp name
    was shared by two runs writing the same --out, and left behind by a failed write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    try:
        # surrogateescape: a file name that is not UTF-8 (read as surrogates) is written as its bytes, not an error
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            if path.suffix.lower() == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            synced(f)  # on disk before the rename: a host crash leaves the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-score", description="Score images with rewards (see reward_models/).",
                                epilog=(__doc__ or "").partition("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", required=True, help="comma-separated reward names, e.g. clip,toy-judge")
    p.add_argument("--images", required=True, help="image FOLDER or Pick-a-Pic PARQUET (see below)")
    p.add_argument("--prompts", help="FILE.txt / FILE.jsonl / FILE.csv (folders only; see below)")
    p.add_argument("--out", required=True, help="scores.jsonl or scores.csv")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and scored per reward call (32)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: CUDA when available)")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE", help="reward option")
    p.add_argument("--pairwise", action="store_true", help="parquet only: preference accuracy vs label_0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--tf32", action="store_true", help="CUDA: fp32 matrix products in TensorFloat-32 (batches 2.1-2.7x "
                   "faster on an H200, README); scores round differently")
    return p


def use_tf32(device: Optional[str]) -> bool:
    """--tf32: fp32 matrix products in TensorFloat-32 on CUDA (`torch.set_float32_matmul_precision("high")`; cuDNN's
    convolutions take TF32 by default already). On another device a note says it does nothing. Whether it took."""
    import torch

    from .base import resolve_device

    found = resolve_device(device)
    if found.type != "cuda":
        print(f"note: --tf32 acts on CUDA only; scoring on {found} in full fp32", file=sys.stderr)
        return False
    torch.set_float32_matmul_precision("high")
    return True


def open_source(images: Path, prompts: Optional[Path], pairwise: bool) -> Tuple[int, Iterable[Item]]:
    if not images.exists():
        raise UsageError(f"--images {images} does not exist")
    if images.is_file() and images.suffix.lower() != ".parquet":
        raise UsageError(f"--images {images} is neither a folder nor a .parquet file: give a folder of images (with "
                         "metadata.jsonl or --prompts) or Pick-a-Pic parquet files")
    folder = images.is_dir() and (prompts is not None or (images / "metadata.jsonl").is_file()
                                  or any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()))
    if images.is_dir() and not folder and not any(images.glob("*.parquet")):
        raise UsageError(f"--images {images} holds no images ({'/'.join(IMAGE_SUFFIXES)}), no metadata.jsonl and no "
                         "*.parquet: give a folder of images or Pick-a-Pic parquet files")
    if (folder and pairwise) or (not folder and prompts is not None):
        raise UsageError("--pairwise is for Pick-a-Pic parquets; --prompts for image folders (a parquet has captions)")
    # nothing to score (an empty metadata.jsonl, a header-only CSV, row-less parquets): an error, not an empty --out
    if not folder:
        total, rows = parquet_items(images, pairwise)
        if not total:
            raise UsageError(f"no images to score in {images}: its parquet files hold no rows; give Pick-a-Pic files "
                             "with pairs")
        return total, rows
    items = folder_items(images, prompts)
    if not items:
        raise UsageError(f"no images to score in {images}: {prompts or images / 'metadata.jsonl'} lists none; give "
                         "one row (or line) per image")
    return len(items), items


def _run(args: argparse.Namespace) -> int:
    args.images, args.out = given_path(args.images, "--images"), given_path(args.out, "--out")
    args.prompts = None if args.prompts is None else given_path(args.prompts, "--prompts")
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    options = parse_options(args.option, names)
    if args.out.suffix.lower() not in (".jsonl", ".csv"):
        raise UsageError(f"--out {args.out}: give a .jsonl or .csv file name")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: give a number >= 1")
    metadata = args.prompts or (args.images / "metadata.jsonl" if args.images.is_dir() else args.images)
    check_output_path(args.out, "--out", folder=False, inputs={"--images": args.images, "--prompts": metadata},
                      replaces=[args.out], overwrite=args.overwrite)
    total, items = open_source(args.images, args.prompts, args.pairwise)
    rewards = load_rewards(names, options, args.device)
    if args.tf32:  # after the loads, which refuse a --device that is none
        use_tf32(args.device)
    rows: List[dict] = []
    try:
        with tqdm(total=total, unit="img", file=sys.stderr, disable=None, desc="t2i-score") as bar:
            _, counts = score_items(rewards, items, args.batch_size, lambda batch: bar.update(len(batch)), rows)
        write_rows(rows, args.out)
    except BaseException as stop:  # out of memory, Ctrl-C, --out gone unwritable ...: the images scored so far are kept
        try:
            _keep_partial(rows, args.out)
        except Exception as err:  # a full disk: the first error is the one to see
            print(f"t2i-score could not keep the {len(rows)} rows scored so far: {err}", file=sys.stderr)
        if _out_of_memory(stop):  # a traceback before, for what README's remedy fixes
            first = (str(stop).splitlines() or [""])[0][:120]
            raise UsageError(f"out of memory scoring {args.batch_size} images at a time ({first}): lower --batch-size "
                             "(and a reward's own NAME.batch_size option)") from stop
        raise
    summary = {**summarize(rows, names, counts), "out": str(args.out)}
    summary.update({"pairwise": pairwise_accuracy(rows, names)} if args.pairwise else {})
    print(json.dumps(summary, indent=2))
    return _none_scored(rows, summary["rewards"])


def _out_of_memory(err: BaseException) -> bool:
    """A GPU's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                            and "can't allocate memory" in str(err))


def _keep_partial(rows: List[dict], out: Path) -> None:
    """The rows of the batches finished before a failure, as OUT's name with .partial (scores.partial.jsonl;
    .partial-2, -3 ...: never one replaced), beside OUT or, where that cannot be written, in the working folder."""
    if not rows:
        return
    for folder in (out.parent, Path.cwd()):
        for n in itertools.count(1):
            path = folder / f"{out.stem}.partial{'' if n == 1 else f'-{n}'}{out.suffix}"
            if not path.exists():
                break
        try:
            write_rows(rows, path)
            break
        except OSError:
            if folder == Path.cwd():
                raise
    print(f"t2i-score did not finish after scoring {len(rows)} images; their scores are in {path} (the same command "
          "again scores every image anew)", file=sys.stderr)


def _none_scored(rows: List[dict], rewards: Dict[str, dict]) -> int:
    """1, with an `error:` line, when a reward scored none of the images (every row flagged: e.g. the toy judge
    on captions it cannot read), which otherwise looked like success; the rows are written either way."""
    empty = [name for name, summary in rewards.items() if rows and summary["n"] == 0]
    if not empty:
        return 0
    first = next((r["error"] for r in rows if r.get("error")), "no score was finite")
    print(f"error: {', '.join(empty)} scored none of the {len(rows)} images (first problem: {first}); the rows, "
          "each with its problem, are in --out", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
