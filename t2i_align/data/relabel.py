"""AI feedback: Pick-a-Pic-format pairs relabelled by a reward model (Diffusion-DPO's `--choice_model`, Wallace et
al. 2023, "Learning from AI feedback": PickScore's labels beat the human ones on SD1.5).

The official train.py keeps the pairs people decided (label_0 0 or 1; here also a fraction other than 0.5, which
Pick-a-Pic lacks, decided by its side as training reads it: 0.7 is jpg_0 preferred), then at every step scores the
pair's two images with the caption (batch size 1) and trains on the higher-scored one as the winner. The same
verdicts are computed once here and written as a new data set, so a run reads it as any pair data (`data.path=OUT`)
and the reward runs once, not every epoch: label_0 = 1 if reward(jpg_0) > reward(jpg_1), 0 if lower, 0.5 if equal (a
tie, which training drops by default; the official code would keep jpg_0 first). Every input column is kept; the
human label moves to `human_label_0` (kept from the input when it is already a relabelled file), the scores are
added as `reward_0` and `reward_1`. One output file per input file, of the same name, each written whole (temporary
file, then rename) and then recorded beside it (`<name>.relabel.json`: reward, options, source file, counts; an
older record is removed before the file is replaced), so `resume` keeps the finished ones made the same way. A row
whose image does not decode, or that the reward cannot score, is skipped and counted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..files import write_json_atomic
from ..stats import wilson_interval
from .images import checked_batches, open_parquet
from .listings import write_rows_parquet
from .images import as_text, find_parquet_files
from .pairs import label_problem

ADDED = (("human_label_0", pa.float64()), ("reward_0", pa.float64()), ("reward_1", pa.float64()))


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input's columns, labels as float64 (a tie is 0.5) and has_label as bool (written True; an input may
    hold 0/1 ints), plus human_label_0, reward_0 and reward_1."""
    retyped = {"label_0": pa.float64(), "label_1": pa.float64(), "has_label": pa.bool_()}
    fields = [pa.field(f.name, retyped[f.name]) if f.name in retyped else f
              for f in schema if f.name not in ("reward_0", "reward_1")]
    names = [f.name for f in fields]
    fields += [pa.field("label_0", pa.float64())] if "label_0" not in names else []
    return pa.schema(fields + [pa.field(n, t) for n, t in ADDED if n not in names])


def verdict(score_0: float, score_1: float) -> float:
    """label_0 from the two scores: 1.0 (jpg_0 preferred), 0.0 or 0.5 (equal)."""
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


def new_counts() -> Dict[str, Any]:
    return {"rows": 0, "written": 0,
            "skipped": {"human_tie": 0, "unlabelled": 0, "invalid_label": 0, "unreadable_image": 0, "not_scored": 0,
                        "not_text": 0},
            "reward_ties": 0, "human_labelled": 0, "agree_with_human": 0}


def _human_label(row: Dict[str, Any]) -> Optional[float]:
    """The row's human label_0 (None when unlabelled or invalid); a relabelled file keeps its human_label_0."""
    if "human_label_0" in row:
        return row["human_label_0"]
    return None if label_problem(row.get("label_0"), row.get("has_label")) else float(row["label_0"])


def _skip_reason(row: Dict[str, Any]) -> Optional[str]:
    """Why the official code would not relabel the row (its counter's key), None when people chose a winner. An
    input already relabelled says only that its human label is missing, not why."""
    human = _human_label(row)
    if human is None:
        problem = None if "human_label_0" in row else label_problem(row.get("label_0"), row.get("has_label"))
        return "invalid_label" if problem == "invalid_labels" else "unlabelled"
    return "human_tie" if human == 0.5 else None  # 0.7: jpg_0 preferred, as training reads it (it was a "tie")


def _scored(reward_name: str, reward, rows: List[Dict[str, Any]], counts: Dict[str, Any]) -> Iterator[Dict]:
    """The relabelled rows of one record batch (both images of every row scored in one call of score_items)."""
    from reward_models.cli import Item, score_items

    items = [Item({"i": i, "side": side}, "" if r["caption"] is None else str(as_text(r["caption"])),
                  r[f"jpg_{side}"])
             for i, r in enumerate(rows) for side in (0, 1)]
    scores, _ = score_items({reward_name: reward}, items, batch_size=len(items))
    for i, row in enumerate(rows):
        pair = scores[2 * i: 2 * i + 2]
        if any("unreadable" in (s.get("error") or "") for s in pair):
            counts["skipped"]["unreadable_image"] += 1
            continue
        s0, s1 = (s[reward_name] for s in pair)
        if s0 is None or s1 is None:
            counts["skipped"]["not_scored"] += 1
            problem = next((s.get("error") for s in pair if s.get("error")), None)
            if problem:  # why (a reward that refuses these prompts): the summary said only "not_scored 2"
                counts.setdefault("first_problem", problem)
            continue
        yield _relabelled(row, s0, s1, counts)


def _relabelled(row: Dict[str, Any], s0: float, s1: float, counts: Dict[str, Any]) -> Dict[str, Any]:
    human, label = _human_label(row), verdict(s0, s1)
    counts["reward_ties"] += label == 0.5
    if human is not None and human != 0.5 and label != 0.5:
        counts["human_labelled"] += 1
        counts["agree_with_human"] += (human > 0.5) == (label == 1.0)
    out = {**row, "human_label_0": human, "reward_0": s0, "reward_1": s1, "label_0": label}
    out.update({"label_1": 1.0 - label} if "label_1" in row else {})
    out.update({"has_label": True} if "has_label" in row else {})
    return out


def _batch_rows(batch) -> List[Optional[Dict[str, Any]]]:
    """A record batch's rows; a row holding text that is not UTF-8 (written by a tool that does not check) is None,
    skipped and counted (it stopped the relabelling, where training counts it as a pair without caption)."""
    try:
        rows: List[Optional[Dict[str, Any]]] = batch.to_pylist()
    except UnicodeDecodeError:
        rows = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError:
                rows.append(None)
    # a binary caption column: bytes that are not UTF-8 are no text either (scored, they were str(b'...')); nor is
    # a null caption, which training skips (it was scored as "" and counted in the agreement)
    return [None if r is None or r.get("caption") is None or _undecodable(r.get("caption")) else r for r in rows]


def _undecodable(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray)) and as_text(value) is None


def relabel_file(src: Path, dst: Path, reward_name: str, reward, counts: Dict[str, Any], rows_per_read: int = 32,
                 all_pairs: bool = False, row_group_size: int = 500,
                 progress: Callable[[int], object] = lambda n: None) -> None:
    """One parquet file relabelled into `dst` (written whole or not at all). Rows without a human winner (ties,
    unlabelled, invalid labels) are skipped as in the official code unless `all_pairs`."""
    pf = open_parquet(src)

    def rows() -> Iterator[Dict[str, Any]]:
        for batch in checked_batches(pf.iter_batches(batch_size=max(1, rows_per_read)), src, None):
            read = _batch_rows(batch)
            counts["rows"] += len(read)
            reasons = ["not_text" if r is None else None if all_pairs else _skip_reason(r) for r in read]
            for reason in filter(None, reasons):
                counts["skipped"][reason] += 1
            keep = [r for r, why in zip(read, reasons) if why is None]
            yield from _scored(reward_name, reward, keep, counts) if keep else ()
            progress(len(read))

    counts["written"] += write_rows_parquet(rows(), dst, row_group_size, schema=output_schema(pf.schema_arrow))


def input_files(pairs: Path) -> List[Tuple[str, Path]]:
    """(name, resolved path) of every parquet file of `pairs` (a file or folder), each readable and holding the
    Pick-a-Pic columns relabelling reads; outputs take the names as given (a symlink's, not its target's)."""
    files = find_parquet_files(pairs)  # sorted by the names as given, each resolved inside the folder, a link to
    first: Dict[Path, str] = {}  # another file of it read once: each output named as its first listing
    for listed in sorted(pairs.glob("*.parquet")) if pairs.is_dir() else [pairs]:
        first.setdefault(listed.resolve(), listed.name)
    names = [first[f] for f in files]
    for f in files:
        try:
            found = pq.ParquetFile(f).schema_arrow.names
        except (ValueError, OSError) as err:  # ArrowInvalid is a ValueError
            raise UserError(f"{f} is not a readable parquet file ({str(err).splitlines()[0]}): give "
                            "Pick-a-Pic-format parquet files") from None
        lacking = [c for c in ("caption", "jpg_0", "jpg_1") if c not in found]
        if lacking:
            raise UserError(f"{f} lacks column(s) {lacking}: relabelling needs Pick-a-Pic-format pairs")
    return list(zip(names, files))


def relabel(pairs: Path, out: Path, reward_name: str, reward, setup: Dict[str, Any], resume: bool = False,
            log=print, **options) -> Dict[str, Any]:
    """Every parquet file of `pairs` relabelled into folder `out`, each with a record beside it
    (<name>.relabel.json: `setup` — reward, options —, the source file and its counts); `resume` keeps a finished
    file whose record matches and refuses one made otherwise, or a file of the name relabelling did not write.
    Returns the summed counts, also out/relabel.json."""
    from tqdm.auto import tqdm

    files = input_files(Path(pairs))
    check_no_strays(out, [name for name, _ in files])
    out.mkdir(parents=True, exist_ok=True)
    total, todo = new_counts(), []
    for name, src in files:
        record = {**setup, "all_pairs": bool(options.get("all_pairs")), **_source(src)}
        done = _finished(out / name, record) if resume else _check_ours(out / name)
        if done is None:
            todo.append((name, src, record))
        else:
            _add(total, done)
    if len(todo) < len(files):
        log(f"resume: {len(files) - len(todo)} of {len(files)} files already relabelled in {out}, kept")
    with tqdm(total=sum(open_parquet(src).metadata.num_rows for _, src, _ in todo), unit="pair",
              desc="relabel") as bar:
        for name, src, record in todo:
            counts = new_counts()
            record_path(out / name).unlink(missing_ok=True)  # before the file: a stopped run leaves no record
            relabel_file(src, out / name, reward_name, reward, counts, progress=bar.update, **options)
            write_json_atomic(record_path(out / name), {**record, "counts": counts})  # after: marks it finished
            _add(total, counts)
    summary = {**setup, "files": len(files), "files_kept": len(files) - len(todo), **total}
    summary["agreement_with_human"] = _agreement(total)
    write_json_atomic(out / "relabel.json", summary)
    return summary


def remove_outputs(out: Path, names: List[str], made: bool) -> None:
    """What relabelling wrote in `out` (files of no pair, when none was relabelled: a rerun found them there and
    asked for --overwrite), and the folder if this run `made` it and that leaves it empty."""
    for name in names:
        (out / name).unlink(missing_ok=True)
        record_path(out / name).unlink(missing_ok=True)
    (out / "relabel.json").unlink(missing_ok=True)
    if made and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def check_no_strays(out: Path, names: List[str]) -> None:
    """UserError when output folder `out` holds parquet files that relabelling these inputs would not write: a run
    given the folder would train on them too."""
    stray = sorted(f.name for f in out.glob("*.parquet") if f.name not in names)
    if stray:
        raise UserError(f"{out} holds other parquet files ({', '.join(stray[:3])}), which a run given this folder "
                        "would read too: choose an empty output folder")


def _source(src: Path) -> Dict[str, Any]:
    stat = src.stat()
    return {"source": str(src), "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def record_path(parquet: Path) -> Path:
    return parquet.with_name(parquet.name + ".relabel.json")


def _finished(parquet: Path, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The counts of a finished output made as `record` says; None when it is not finished (no file, or no record:
    the run stopped between the two); UserError when it was made from another source or with another reward, or
    is not relabelling's at all (the user's own file of that name: --resume would have replaced it)."""
    try:
        kept = json.loads(record_path(parquet).read_text(encoding="utf-8")) if parquet.is_file() else None
    except (OSError, ValueError):
        kept = None
    if kept is None:
        if parquet.is_file() and not _ours(parquet):
            raise UserError(f"{parquet} was not written by relabelling (no record, no reward_0 column): give another "
                            "--out, or move that file away")
        return None
    wanted = json.loads(json.dumps(record, default=str))
    differs = sorted(k for k in wanted if kept.get(k) != wanted[k])
    if differs:
        raise UserError(f"{parquet} was made with other {', '.join(differs)} ({record_path(parquet).name}): "
                        "give another --out, or --overwrite to relabel it again")
    return kept["counts"]


def _check_ours(parquet: Path) -> None:
    """UserError for a file of an output's name that relabelling did not write: --overwrite replaced it."""
    if parquet.is_file() and not record_path(parquet).is_file() and not _ours(parquet):
        raise UserError(f"{parquet} was not written by relabelling (no record, no reward_0 column), and --overwrite "
                        "replaces only relabelling's files: give another --out")


def _ours(parquet: Path) -> bool:
    """Whether a parquet file holds relabelling's added columns (a file its run wrote before its record)."""
    try:
        names = pq.ParquetFile(parquet).schema_arrow.names
    except (OSError, ValueError):
        return False
    return all(n in names for n, _ in ADDED)


def _add(total: Dict[str, Any], counts: Dict[str, Any]) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _add(total[key], value)
        elif isinstance(value, str):  # the first file's first_problem
            total.setdefault(key, value)
        else:
            total[key] += value


def _agreement(counts: Dict[str, Any]) -> Dict[str, Any]:
    """How often the reward's verdict is the human one, over pairs with a human winner and no reward tie."""
    n, k = counts["human_labelled"], counts["agree_with_human"]
    if not n:
        return {"n": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(k / n, n)
    return {"n": n, "rate": k / n, "low": low, "high": high}
