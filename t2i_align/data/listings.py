"""Your own data, image files listed in a JSONL or CSV file, as the parquet the loop reads (`data.path`).

Pairs (Pick-a-Pic format): each row names a caption (`caption` or `prompt`) and two image files, either as
winner and loser (`image_w`, `image_l`) or as `image_0`, `image_1` with `label_0` (1: image_0 preferred, 0:
image_1, 0.5: a tie, kept in the file and dropped in training unless `data.ties=first`). Optional: `user_id` (the
rater, for PPD: an integer, or text, and then every id of the file is written as text), `model_0` / `model_1`.
Captions (LongAlign's stage 1, data.kind=captions): a caption and one `image`. Paths are relative to the image
root (default: the listing's folder) and must stay inside it.
A row that cannot be used (a field missing, a caption that is not text, a label outside [0, 1], an image missing,
outside the root or not decodable, a pair whose two images are the same bytes, a user_id that is a number but not
an integer of 64 bits; a JSONL line that is not UTF-8 JSON; a CSV record over several lines, as a quote left open
makes, or with more fields than the header) is skipped and counted by reason; the first few are named.
The image bytes are copied as they are (no re-encoding); the parquet is written in row groups of
`row_group_size` rows (the streaming reader's unit) to a temporary file and renamed when complete.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import fsync_path, write_json_atomic
from .images import DECODE_ERRORS, decode_rgb

logger = logging.getLogger(__name__)

PICKAPIC_SCHEMA = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                             ("label_0", pa.float64()), ("label_1", pa.float64()), ("user_id", pa.int64()),
                             ("are_different", pa.bool_()), ("has_label", pa.bool_()), ("model_0", pa.string()),
                             ("model_1", pa.string()), ("ranking_id", pa.int64())])
PICKAPIC_COLUMNS = tuple(PICKAPIC_SCHEMA.names)
CAPTION_SCHEMA = pa.schema([("caption", pa.string()), ("jpg", pa.binary())])
UserId = Union[int, str]
_NAMED = 5  # skipped rows named one by one; the rest only counted
_GROUP_BYTES = 256 * 2**20  # a row group is written early once its images hold this much (large PNGs)


class SkippedRow(ValueError):
    """Why a listed pair cannot be used; `reason` is its counter's name, `rows` how many rows it counts for (a CSV
    quote left open swallows the lines after it)."""

    def __init__(self, reason: str, detail: str, rows: int = 1) -> None:
        super().__init__(detail)
        self.reason, self.rows = reason, rows


def write_rows_parquet(rows: Iterable[Dict[str, Any]], path: Path, row_group_size: Optional[int] = None,
                        schema: pa.Schema = PICKAPIC_SCHEMA) -> int:
    """Rows (dicts of the schema's columns, Pick-a-Pic's by default) to `path` through a temporary file renamed when
    complete, so a reader never sees half a file. Row groups of `row_group_size` rows (None: no count), written as
    they fill, each cut early once its images pass 256 MB. Returns how many rows were written."""
    tmp = path.with_name(path.name + ".tmp")
    rows, written = iter(rows), 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for group in _groups(rows, row_group_size):
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                written += len(group)
        fsync_path(tmp)  # on disk before the rename: a host crash leaves the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _groups(rows: Iterator[Dict[str, Any]], size: Optional[int]) -> Iterator[list]:
    """Rows in lists of `size` (None: one list), a list cut early once its image bytes pass _GROUP_BYTES."""
    group, held = [], 0
    for row in rows:
        group.append(row)
        held += sum(len(v) for v in row.values() if isinstance(v, bytes))
        if len(group) == size or held > _GROUP_BYTES:
            yield group
            group, held = [], 0
    if group:
        yield group


def read_listing(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, row) of a .jsonl or .csv listing; a row that cannot be read is a SkippedRow."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UserError(f"--from {path}: expected a .jsonl or .csv listing")
    yield from _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[Tuple[int, Any]]:
    """Each line decoded alone: a line that is not UTF-8 or not a JSON object is a skipped row."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: a byte-order mark dropped
            except UnicodeDecodeError as err:
                yield number, SkippedRow("not_utf8", f"not UTF-8 text (byte {err.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, an int of 5000 digits, deep nesting
                row = SkippedRow("not_json", f"not JSON ({err})")
            yield number, row if isinstance(row, (dict, SkippedRow)) else SkippedRow("not_json", "not an object")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _csv_rows(path: Path) -> Iterator[Tuple[int, Any]]:
    """(the record's line, row). A record over several lines (a quote left open swallows the rows after it
    into one field: one skipped row per line it took) or with more fields than the header (an unquoted comma) is
    skipped, not read wrong, as is one with a line that is not UTF-8 (the rows around it are read)."""
    # -sig: a byte-order mark (Excel's CSV) dropped; surrogateescape: bytes that are not UTF-8 kept as lone
    # surrogates, marking their line (a strict decode stopped the whole import at the first such byte)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        starts: List[int] = []  # the numbers of the non-blank lines the reader took since the last record
        bad = set()  # the lines that were not UTF-8

        def lines() -> Iterator[str]:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    starts.append(number)
                if _NOT_UTF8.search(line):
                    bad.add(number)
                yield line
        reader = csv.DictReader(lines())
        try:
            _ = reader.fieldnames  # the header read now: its line is not a record's
            if bad:
                raise UnicodeError("its header line is not UTF-8")
            starts.clear()
            for row in reader:
                first, end = starts[0] if starts else reader.line_num, reader.line_num
                taken = max(1, len(starts))
                not_utf8 = bad.intersection(starts)
                starts.clear()
                if not_utf8:
                    where = "" if min(not_utf8) == first else f" (line {min(not_utf8)})"
                    yield first, SkippedRow("not_utf8", f"not UTF-8 text{where}", taken)
                elif any("\n" in v or "\r" in v for v in row.values() if isinstance(v, str)):
                    yield first, SkippedRow("multiline_record", f"a quoted field runs over lines {first}-{end} (a "
                                            "quote left open?); quote whole fields, with no line break inside", taken)
                elif None in row:
                    yield first, SkippedRow("extra_fields", f"{len(row[None])} more field(s) than the header names "
                                            "(an unquoted comma?); quote fields that hold commas")
                else:
                    yield first, row
        except csv.Error as err:
            if "field larger than field limit" in str(err):  # an open quote swallowed the rest of the file
                raise UserError(f"--from {path}: a quote opened in the record starting on line "
                                f"{starts[0] if starts else reader.line_num} is never closed (its field runs past "
                                f"{csv.field_size_limit()} characters): close it, quoting whole fields") from None
            raise UserError(f"--from {path}: cannot be read as CSV text after line {reader.line_num}: {err}; save "
                            "it as UTF-8 CSV") from None
        except UnicodeError as err:  # the listing itself cannot be read on
            raise UserError(f"--from {path}: cannot be read as CSV (UTF-8) text after line {reader.line_num}: "
                            f"{err}; save it as UTF-8 CSV") from None


def _field(row: Dict[str, Any], *names: str) -> Any:
    value = next((row[n] for n in names if row.get(n) not in (None, "")), None)
    if value is None:
        raise SkippedRow("missing_field", f"no {' or '.join(names)}")
    return value


def _caption(row: Dict[str, Any]) -> str:
    """The caption as text: a JSON list, object or number is refused (str() would train on "['a', 'b']")."""
    caption = _field(row, "caption", "prompt")
    if not isinstance(caption, str):
        raise SkippedRow("bad_caption", f"caption {caption!r} is not text")
    return _utf8(caption, "caption")


def _utf8(text: str, name: str) -> str:
    """`text` if parquet can store it: a lone surrogate (JSON "\\ud800") would fail the whole write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SkippedRow("bad_text", f"{name} {text!r} holds a lone surrogate, not a character") from None
    return text


def _label(row: Dict[str, Any]) -> Tuple[str, str, float]:
    """(image_0, image_1, label_0) from either layout."""
    if row.get("image_w") not in (None, "") or row.get("image_l") not in (None, ""):
        return _field(row, "image_w"), _field(row, "image_l"), 1.0
    first, second, raw = _field(row, "image_0"), _field(row, "image_1"), _field(row, "label_0")
    try:
        label = float(raw)
    except (TypeError, ValueError):
        label = math.nan
    if not 0.0 <= label <= 1.0:  # NaN fails too
        raise SkippedRow("bad_label", f"label_0 {raw!r} is not a number in [0, 1]")
    return first, second, label


def _image_bytes(root: Path, name: Any) -> bytes:
    """The file's bytes, once it resolves inside `root` and decodes."""
    try:
        real = (root / str(name)).resolve()
        if not real.is_relative_to(root):
            raise SkippedRow("outside_root", f"image {name!r} resolves to {real}, outside the image root {root}")
        if not real.is_file():
            raise SkippedRow("missing_image", f"image {name!r}: no such file under {root}")
        data = real.read_bytes()
    except (OSError, ValueError, RuntimeError) as err:  # unreadable, a NUL in the name, a symlink loop ...
        if isinstance(err, SkippedRow):
            raise
        raise SkippedRow("unreadable_image", f"image {name!r} cannot be read ({err})") from None
    try:
        decode_rgb(data)  # as training reads it
    except DECODE_ERRORS as err:
        raise SkippedRow("undecodable_image", f"image {name!r} does not decode ({err})") from err
    return data


def _user_id(row: Dict[str, Any], text: bool = False) -> Optional[UserId]:
    """The row's user id: an int (JSON's 12, CSV's "12"), else its text ("alice", as a user table's JSON keys
    are); with `text` (the listing has text ids: one parquet column, one type), an int as its text too."""
    raw = row.get("user_id")
    if raw in (None, ""):
        return None
    if isinstance(raw, str) and not _is_number(raw):
        return _utf8(raw, "user_id")
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        value = int(raw)  # a str must spell an integer: "12", not "12.0" or "1e3" (a float's id, digits lost)
        if not -2**63 <= value < 2**63:
            raise OverflowError
        return str(value) if text else value
    except (TypeError, ValueError, OverflowError):
        raise SkippedRow("bad_user_id", f"user_id {raw!r} is not text nor an integer of at most 64 bits") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text_user_ids(listing: Path) -> bool:
    """Whether some row's user_id is text (not an integer): read ahead, as the parquet's column type is fixed
    when it is opened. Then every id is written as text, so 12 and "12" stay one user."""
    for _, row in read_listing(listing):
        try:
            if isinstance(row, dict) and isinstance(_user_id(row), str):
                return True
        except SkippedRow:  # counted when the row is imported
            continue
    return False


def pair_row(row: Any, root: Path, ranking_id: int, text_ids: bool = False) -> Dict[str, Any]:
    """One listing row as a Pick-a-Pic row (`text_ids`: its user_id as text); SkippedRow if it cannot be used."""
    if isinstance(row, SkippedRow):
        raise row
    caption = _caption(row)
    first, second, label = _label(row)
    jpg_0, jpg_1 = _image_bytes(root, first), _image_bytes(root, second)
    if jpg_0 == jpg_1:  # the same file twice, or two copies: DPO's two errors are equal, nothing is learnt
        raise SkippedRow("same_image", f"images {first!r} and {second!r} are the same image: no preference")
    return {"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label, "label_1": 1.0 - label,
            "user_id": _user_id(row, text_ids), "are_different": True, "has_label": True,
            "model_0": _utf8(str(row.get("model_0") or ""), "model_0"),
            "model_1": _utf8(str(row.get("model_1") or ""), "model_1"),
            "ranking_id": ranking_id}


def caption_row(row: Any, root: Path, number: int) -> Dict[str, Any]:
    """One listing row as an image-caption row; SkippedRow if it cannot be used."""
    if isinstance(row, SkippedRow):
        raise row
    return {"caption": _caption(row), "jpg": _image_bytes(root, _field(row, "image"))}


KINDS = {  # kind: (schema, row maker, what a row needs)
    "pairs": (PICKAPIC_SCHEMA, pair_row, "caption or prompt, and image_w + image_l or image_0 + image_1 + label_0"),
    "captions": (CAPTION_SCHEMA, caption_row, "caption or prompt, and image"),
}


def _no_usable_row(listing: Path, skipped: Counter, columns: List[str], needs: str, root: Path,
                   given_root: bool) -> UserError:
    """Why no row was usable: image paths that leave the root (a listing in meta/ naming ../images/...) are
    said as such, not as the fields a row needs, which were all there."""
    if skipped["outside_root"] * 2 > sum(skipped.values()):
        where = "--image-root" if given_root else "the listing's folder, the default image root"
        return UserError(f"no usable row in {listing}: the image paths of {skipped['outside_root']} of "
                         f"{sum(skipped.values())} rows leave {root} ({where}; skipped: {dict(skipped)}); pass "
                         "--image-root FOLDER, the folder that holds every image, which the paths are relative to")
    found = f"; its first row's fields: {', '.join(columns)}" if columns else ""
    one_field = len(columns) == 1 and any(mark in columns[0] for mark in ";\t")
    found += " (a CSV is comma-separated)" if one_field and listing.suffix.lower() == ".csv" else ""
    return UserError(f"no usable row in {listing} (skipped: {dict(skipped) or 'no rows'}); each row needs "
                     f"{needs}{found}")


def import_listing(kind: str, listing: Path, out_dir: Path, image_root: Optional[Path] = None,
                   row_group_size: int = 500, log: Callable[[str], object] = logger.warning) -> Dict[str, Any]:
    """Write out_dir/<kind>.parquet and out_dir/<kind>.json (the counts) from `listing`; returns the counts. With no
    usable row nothing is written (an earlier parquet there stays). `log` tells the first skipped rows."""
    schema, make_row, needs = KINDS[kind]
    if kind == "pairs" and _text_user_ids(listing):  # PPD's tables take text ids; the parquet reader does too
        schema = schema.set(schema.get_field_index("user_id"), pa.field("user_id", pa.string()))
        make_row = functools.partial(pair_row, text_ids=True)
    root = Path(image_root or listing.parent).resolve()
    skipped: Counter = Counter()
    ties: Counter = Counter()
    columns: List[str] = []  # the first row's, for the message when no row is usable

    def rows() -> Iterator[Dict[str, Any]]:
        # every image is read and decoded: minutes for a large listing (no bar when stderr is not a terminal)
        for number, row in tqdm(read_listing(listing), desc=f"import {kind}", unit="row", file=sys.stderr,
                                disable=None):
            if not columns and isinstance(row, dict):
                columns.extend(map(str, row))
            try:
                made = make_row(row, root, number)
            except SkippedRow as why:
                named = sum(skipped.values()) < _NAMED  # before this one: a record of 10 lines is named too
                skipped[why.reason] += why.rows
                if named:
                    log(f"{listing} line {number} skipped: {why}")
                continue
            ties["ties"] += made.get("label_0") == 0.5
            yield made

    out_dir.mkdir(parents=True, exist_ok=True)
    staged, final = out_dir / f".{kind}.parquet.importing", out_dir / f"{kind}.parquet"
    written = write_rows_parquet(rows(), staged, row_group_size, schema)
    if not written:
        staged.unlink()
        raise _no_usable_row(listing, skipped, columns, needs, root, given_root=image_root is not None)
    counts = {kind: written, **({"ties": ties["ties"]} if kind == "pairs" else {}),
              "skipped": dict(sorted(skipped.items())), "image_root": str(root), "out": str(final)}
    (out_dir / f"{kind}.json").unlink(missing_ok=True)  # a kill between the two writes: no counts of another import
    os.replace(staged, final)
    write_json_atomic(out_dir / f"{kind}.json", counts)
    if sum(skipped.values()) > _NAMED:
        log(f"{listing}: {sum(skipped.values()) - _NAMED} more rows skipped (counted by reason in {kind}.json)")
    return counts
