"""What `t2i-score` scores: image files of a folder with their prompts, or the two images of each Pick-a-Pic row
(`folder_items`, `parquet_items`), as `Item`s decoded only when scored."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pyarrow.parquet as pq

from t2i_align.data.images import as_text, check_aspect, decode_image
from t2i_align.data.images import find_parquet_files
from t2i_align.data.pairs import label_problem
from t2i_align.errors import UserError, one_line
from t2i_align.prompts import csv_records, json_value, numbered_lines, text_lines

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OTHER_IMAGES = (".tif", ".tiff", ".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2")
"""Image files a folder may hold that a --prompts text file is not matched to: said, not skipped silently."""


class UsageError(UserError):
    """A mistake in the command line: printed as `error: ...`, exit code 2 (see t2i_align/errors.py)."""


class BadRow(ValueError):
    """A row the input describes badly (no file, a prompt that is not text, a line that is not JSON): its output
    row's `error`, the other rows are scored."""


class Item(NamedTuple):
    """One image to score: `key` goes into its output row; `data` is a Path or encoded bytes (None: a path that
    may not be read); `problem`: why the row cannot be scored (not read then)."""
    key: Dict[str, Any]
    prompt: str
    data: Any
    problem: Optional[str] = None

    def decode(self):
        if self.problem:
            raise BadRow(self.problem)
        if self.data is None:  # a listed path that leads out of the image folder: this row's error, not the run's
            raise ValueError("its path resolves outside the image folder (or is not a valid file name): not read")
        return check_aspect(decode_image(self.data.read_bytes() if isinstance(self.data, Path) else self.data),
                            "score")


def _read_table(path: Path) -> List[Tuple[str, str, Optional[str]]]:
    """(file, prompt, problem) rows from a .csv with a header or a .jsonl of objects; a bad row keeps its place
    with its problem (and file "" when it names none): skipped and counted by the scoring, not the run's end. A
    CSV quote left open (it takes the rows after it) ends the run. Problems name the file's line."""
    try:  # split at line ends only: str.splitlines also cuts at \x0c, \x85, U+2028 ... inside a prompt
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".csv":
            rows: List[Tuple[int, Any]] = csv_records(text)
        else:
            rows = [(number, _json_line(s)) for number, s in numbered_lines(text)]
    except ValueError as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    table = [_table_row(path, number, r) for number, r in rows]
    if table and all(problem for _, _, problem in table):  # the file's format, not a row's: before any reward loads
        raise UsageError(f"no row of {path} can be scored (first: {table[0][2]}); give `file` and `prompt` columns "
                         "(CSV header) or fields (one JSON object per line)")
    return table


def _table_row(path: Path, number: int, r: Any) -> Tuple[str, str, Optional[str]]:
    where = f"{path.name} line {number}"
    if isinstance(r, _NotJson):
        return "", "", f"{where} is not JSON ({r.error}): one object per line"
    if not isinstance(r, dict) or r.get("file") is None or "prompt" not in r:
        found = list(r) if isinstance(r, dict) else type(r).__name__
        return str(r.get("file") or "") if isinstance(r, dict) else "", "", \
            f"{where}: expected fields 'file' and 'prompt', found {found}"
    if path.suffix.lower() == ".csv" and (None in r or None in r.values()):  # DictReader's rest key / value
        return str(r["file"]), "", (f"{where} has {'more' if None in r else 'fewer'} fields than the header (a comma "
                                    "in a prompt? put the prompt in double quotes)")
    prompt = r["prompt"]
    if isinstance(prompt, (list, dict, bool)):  # numbers are read as text, as parquet captions are
        return str(r["file"]), "", f"{where}: the prompt is not text ({type(prompt).__name__})"
    return str(r["file"]), "" if prompt is None else str(prompt), None


class _NotJson(NamedTuple):
    error: str


def _json_line(line: str) -> Any:
    try:
        return json_value(line)
    except ValueError as e:
        return _NotJson(str(e))


def _inside(folder: Path, root: Path, name: str) -> bool:
    try:
        return not Path(name).is_absolute() and (folder / name).resolve().is_relative_to(root)
    except (ValueError, OSError):  # a NUL byte in the name, a loop of links
        return False


def folder_items(folder: Path, prompts: Optional[Path]) -> List[Item]:
    prompts = folder / "metadata.jsonl" if prompts is None else prompts
    if prompts.is_dir():
        raise UsageError(f"--prompts {prompts} is a folder: give a .jsonl, .csv or text file of prompts")
    if not prompts.is_file():
        raise UsageError(f"no prompts: {prompts} does not exist (pass --prompts FILE or write FOLDER/metadata.jsonl)")
    if prompts.suffix.lower() == ".parquet":
        raise UsageError(f"--prompts {prompts} is a parquet file: score Pick-a-Pic pairs with --images {prompts} "
                         "(their captions are in it), or give a .txt, .jsonl or .csv file of prompts")
    if prompts.suffix.lower() in (".jsonl", ".csv"):
        table = _read_table(prompts)
    else:
        entries = list(folder.iterdir())
        files = sorted((p.name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()),
                       key=natural_key)
        others = sorted(p.name for p in entries if p.suffix.lower() in OTHER_IMAGES)
        if others:
            warnings.warn(f"{folder}: {len(others)} image file(s) of other formats are not scored (only "
                          f"{'/'.join(IMAGE_SUFFIXES)}), e.g. {others[:3]}; list them in a .jsonl or .csv --prompts "
                          "file to score them")
        lines = _prompt_lines(prompts)
        if len(lines) != len(files):
            blank = f", {lines.count('')} of them blank (each an empty prompt here)" if "" in lines else ""
            meta = (f"; {folder / 'metadata.jsonl'} names each image's prompt (sample/generate.py writes it): drop "
                    "--prompts to use it") if (folder / "metadata.jsonl").is_file() else ""
            raise UsageError(f"{prompts} has {len(lines)} prompt lines{blank} but {folder} has {len(files)} image "
                             f"files ({'/'.join(IMAGE_SUFFIXES)}); give one line per image, in name order{meta}")
        table = [(name, line, None) for name, line in zip(files, lines)]
    root = folder.resolve()
    return [Item({"file": name}, p, folder / name if _inside(folder, root, name) else None, problem)
            for name, p, problem in table]


def natural_key(name: str) -> list:
    """Name order with numbers by value: 2_0.png before 10_0.png (sorted as text, 10_0 took the second prompt)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _prompt_lines(path: Path) -> List[str]:
    """The prompts of a text file (one per line, blank = empty prompt) or a .json list of them; a .tsv or .yaml
    file is refused (its lines, a header among them, became prompts without a word)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if path.suffix.lower() in (".tsv", ".yaml", ".yml"):
        raise UsageError(f"--prompts {path} is a {path.suffix} file, which is not read here (its lines would become "
                         "prompts): give a text file (one prompt per line), a .json list, or a .jsonl / .csv of "
                         "file and prompt")
    if path.suffix.lower() != ".json":
        return text_lines(text)
    try:
        prompts = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--prompts {path} is not JSON ({err}): give a JSON list of prompts") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"--prompts {path} is not a JSON list of prompts (text): give one, in the images' name order")
    return prompts


def parquet_items(path: Path, pairwise: bool) -> Tuple[int, Iterator[Item]]:
    """(image count, lazily read items): columns are checked now, image bytes read one record batch at a time."""
    need, total = ["caption", "jpg_0", "jpg_1"] + (["label_0"] if pairwise else []), 0
    try:
        files = find_parquet_files(path)
        for f in files:
            meta = pq.ParquetFile(f)
            found = meta.schema_arrow.names
            if any(c not in found for c in need):
                raise UsageError(f"{f} lacks column(s) {[c for c in need if c not in found]}: expected Pick-a-Pic "
                                 f"columns {need}, found {found}")
            total += 2 * meta.metadata.num_rows
        if pairwise and total:
            _check_labels(path, files)
    except (ValueError, OSError) as e:  # not a parquet file (ArrowInvalid is a ValueError), outside the folder
        raise UsageError(f"--images {path}: {e}") from e
    return total, _parquet_rows(files)


def _check_labels(path: Path, files: List[Path]) -> None:
    """--pairwise with no pair it can count (label_0 as text, "1" or "tie"; all unlabelled or tied): an error
    before any reward loads, not a run that scores every image and reports accuracy null. Bad labels among usable
    ones are excluded and counted, as training skips them (`pairwise_accuracy`)."""
    problems: Dict[str, int] = {}
    first = None
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("label_0", "has_label") if c in pf.schema_arrow.names]
        records = (r for batch in pf.iter_batches(batch_size=4096, columns=cols) for r in batch.to_pylist())
        for row, r in enumerate(records):
            label = r.get("label_0")
            problem = label_problem(label, r.get("has_label")) or ("ties" if label == 0.5 else None)
            if problem is None:
                return
            problem = problem.replace("_", " ")
            problems[problem] = problems.get(problem, 0) + 1
            if problem == "invalid labels" and first is None:
                first = f"first: {label!r} in {f.name} row {row}; "
    counts = ", ".join(f"{n} {problem}" for problem, n in problems.items())
    raise UsageError(f"--pairwise: no pair of --images {path} has a usable label_0 ({counts}; {first or ''}label_0 "
                     "must be a number in [0, 1], P(jpg_0 preferred): 1.0 when jpg_0 wins, 0.0 when jpg_1 wins, 0.5 "
                     "a tie, not counted); drop --pairwise to score the images alone")


def _parquet_rows(files: List[Path]) -> Iterator[Item]:
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("caption", "jpg_0", "jpg_1", "label_0", "has_label") if c in pf.schema_arrow.names]
        row = 0
        for group in range(pf.metadata.num_row_groups):
            for r in _group_records(pf, group, cols, pf.metadata.row_group(group).num_rows):
                yield from _row_items(f, row, r)
                row += 1


def _group_records(pf, group: int, cols: List[str], n: int) -> Iterator[Any]:
    """The `n` records of row group `group`, 64 at a time; once it fails to read (a damaged download: "Couldn't
    deserialize thrift" stopped the run, the later files unscored), its rest as the error's text."""
    done = 0
    try:
        for batch in pf.iter_batches(batch_size=64, row_groups=[group], columns=cols):
            for r in batch.to_pylist():
                done += 1
                yield r
    except (OSError, ValueError) as err:
        why = f"unreadable row group {group} of the file ({type(err).__name__}: {one_line(err)[:200]})"
        yield from [why] * (n - done)


def _row_items(f: Path, row: int, r: Any) -> Iterator[Item]:
    """The two images of record `r` (a dict, or the text of why it could not be read)."""
    if isinstance(r, str):
        for side in (0, 1):
            yield Item({"parquet": f.name, "row": row, "side": side, "label_0": None, "label_problem": None}, "",
                       None, r)
        return
    problem = label_problem(r.get("label_0"), r.get("has_label"))  # 3.0 or NaN: invalid, as in training
    label = None if problem else float(r["label_0"])
    caption = as_text(r["caption"])  # a binary column's bytes were scored as the text "b'...'"
    for side in (0, 1):
        data = r[f"jpg_{side}"]
        yield Item({"parquet": f.name, "row": row, "side": side, "label_0": label, "label_problem": problem},
                   "" if caption is None else str(caption), data,
                   f"jpg_{side} is null: no image in this row" if data is None else None)
