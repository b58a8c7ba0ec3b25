"""Prompt lists: a text file with one prompt per line, the `caption` (or `prompt`) field of a .jsonl / .csv file
(t2i-score's prompt files, generate.py's metadata.jsonl, a pair or caption listing: each prompt once), a
parquet file's `caption` column (a caption data set's,
e.g. LongAlign's stage-1 data for stage 2: its multi-paragraph captions whole), or a toy-world prompt set:
"toy:train", "toy:heldout" (the one-sentence captions) or "toy:train-long", "toy:heldout-long" (the six-sentence
captions whose background sentence lies beyond CLIP's 77 tokens, `toy_long_captions`)."""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .config import ConfigError

logger = logging.getLogger(__name__)

TOY_SETS = ("toy:train", "toy:heldout", "toy:train-long", "toy:heldout-long")
PROMPT_FILES = ("a text file with one prompt per line, a .jsonl / .csv with a caption or prompt field, or a .json "
                "list")


def toy_long_captions(name: str) -> List[str]:
    """The long caption of every scene of prompt set `name` ("train" / "heldout"), scene i's filler sentences
    shuffled by random.Random(i): fixed, and varied from prompt to prompt."""
    from .toy.evaluate import prompt_set
    from .toy.scenes import long_caption

    return [long_caption(scene, random.Random(i)) for i, scene in enumerate(prompt_set(name))]


def text_lines(text: str) -> List[str]:
    """A text file's lines, split at newlines only (read_text made \\r\\n and \\r into \\n): str.splitlines also splits
    at form feeds, U+2028 and other separators, cutting a prompt that holds one in two."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_prompts(spec: str, what: str = "prompts") -> List[str]:
    """Prompts from `spec`; blank lines are skipped. `what` names the setting in error messages. A prompt that is
    not valid Unicode (half of a surrogate pair, from JSON's "\\ud83d") is refused: the tokenizer failed on it with
    a traceback, after the model had loaded."""
    prompts = _read_prompts(spec, what)
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{what}: prompt {i + 1} of {spec} ({prompt[:40]!r}) holds half of a character (a lone "
                              "UTF-16 surrogate, e.g. a cut emoji); fix or remove it") from None
    return prompts


def _read_prompts(spec: str, what: str) -> List[str]:
    if spec.startswith("toy:"):
        from .toy.evaluate import prompt_set
        from .toy.scenes import short_caption

        name = spec[4:]
        try:
            if name.endswith("-long"):
                return toy_long_captions(name[:-len("-long")])
            return [short_caption(s) for s in prompt_set(name)]
        except ValueError as err:
            raise ConfigError(f"{what}: {err} (as one of {', '.join(TOY_SETS)})") from None
    path = Path(spec)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; give {PROMPT_FILES}, or one parquet file with a caption "
                          "column")
    if not path.is_file():
        raise ConfigError(f"{what}: prompts file {path} not found; give {PROMPT_FILES} (or toy:train / "
                          "toy:heldout, -long for the long captions, for the toy world)")
    if path.suffix.lower() == ".parquet":
        return parquet_captions(path, what)
    if path.suffix.lower() in (".jsonl", ".csv", ".json"):  # read as text, a header or a JSON line became a prompt
        return table_prompts(path, what)
    if path.suffix.lower() in (".tsv", ".yaml", ".yml"):
        raise ConfigError(f"{what}: {path} is a {path.suffix} file, which is not read here (its lines would become "
                          f"prompts); give {PROMPT_FILES}")
    try:
        # utf-8-sig: a BOM (Windows editors write one) is not part of the first prompt
        prompts = [line.strip() for line in text_lines(path.read_text(encoding="utf-8-sig")) if line.strip()]
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if not prompts:
        raise ConfigError(f"{what}: {path} holds no prompts; write one prompt per line")
    return prompts


_FORMS = {".csv": "UTF-8 CSV with a header holding a caption or prompt column",
          ".jsonl": "UTF-8 JSON lines, one object with a caption or prompt field per line",
          ".json": "a UTF-8 JSON list of prompts, or of objects with a caption or prompt field"}
"""What a prompt file of each suffix must hold, as the errors say."""


def table_prompts(path: Path, what: str = "prompts") -> List[str]:
    """The `caption` (else `prompt`) field of every row of a .csv with a header or a .jsonl of objects, as a pair
    listing is read (`data/listings.py`), in order, each prompt once: such files list images (generate.py's
    metadata.jsonl, a row per seed), and a prompt read once per image would be sampled seeds × seeds times and
    counted as several prompts by compare.py's statistics. Empty ones are skipped, as blank lines are. Errors name
    the file's own line (a .json list's item)."""
    try:
        located = _located_rows(path, path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{what}: cannot read {path}: {err}; give {_FORMS[path.suffix.lower()]}") from None
    rows = [r for _, r in located]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{what}: {path} holds no rows of fields; give {_FORMS[path.suffix.lower()]}")
    torn = next((where for where, r in located if path.suffix.lower() == ".csv"  # DictReader's rest key / value
                 and (None in r or None in r.values())), None)
    if torn is not None:
        raise ConfigError(f"{what}: {path} {torn} has more or fewer fields than the header (a comma in a "
                          "prompt? put the prompt in double quotes)")
    bare = next(((where, r) for where, r in located if "caption" not in r and "prompt" not in r), None)
    if bare is not None:
        raise ConfigError(f"{what}: {bare[0]} of {path} has no 'caption' or 'prompt' field, only "
                          f"{sorted(bare[1])} ({_FORMS[path.suffix.lower()]}; a text file with one prompt per "
                          "line needs the .txt suffix)")
    texts = (r["caption"] if "caption" in r else r["prompt"] for r in rows)
    # a number reads as its text; a list or an object is no prompt (str() made "['a', 'b']" one)
    texts = [str(t) for t in texts if isinstance(t, (str, int, float)) and not isinstance(t, bool)]
    prompts = list(dict.fromkeys(" ".join(t.split()) for t in texts if t.strip()))
    if not prompts:
        raise ConfigError(f"{what}: {path} holds no prompts (every caption or prompt is empty)")
    if len(prompts) < len(rows):
        logger.info("%s: %d prompts from the %d rows of %s (repeats and empty ones read once / skipped)", what,
                    len(prompts), len(rows), path)
    return prompts


def _located_rows(path: Path, text: str) -> List[Tuple[str, Any]]:
    """(where, row) of a prompt table's rows: "line N" of a .csv (a record's first line) or .jsonl, "item N" of a
    .json list of prompts (benchmark prompt lists) or of objects."""
    if path.suffix.lower() == ".csv":
        return [(f"line {number}", row) for number, row in csv_records(text)]
    if path.suffix.lower() == ".json":
        rows = json.loads(text)
        rows = [{"prompt": r} if isinstance(r, str) else r for r in rows] if isinstance(rows, list) else [rows]
        return [(f"item {i + 1}", row) for i, row in enumerate(rows)]
    located = []
    for number, line in numbered_lines(text):
        try:
            located.append((f"line {number}", json_value(line)))
        except ValueError as err:
            raise ValueError(f"line {number} is not JSON ({err})") from None
    return located


def numbered_lines(text: str) -> List[Tuple[int, str]]:
    """(the file's 1-based line number, line) of each non-blank line of `text`, split as `text_lines` splits: a
    count of the non-blank lines named the wrong line after a blank one."""
    return [(number, line) for number, line in enumerate(text_lines(text), 1) if line.strip()]


def json_value(line: str) -> Any:
    """One JSON line's value, or ValueError with json's message and column (its own position says "line 1" on every
    line: the caller names the file's line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{err.msg} at column {err.colno}") from None
    except RecursionError:  # nested thousands deep
        raise ValueError("nested too deep") from None


_OPEN_QUOTE = 'a quote left open? close it, or write a quote inside a field as two ("")'


def csv_records(text: str) -> List[Tuple[int, Dict[Any, Any]]]:
    """(first line, row) of each record of CSV `text` with a header, as csv.DictReader reads it (fields past the
    header under the key None, missing ones None). Read strictly: a double quote left open took the rows after it
    into one field without a word from csv; strict, it ends in an error (at the file's end, or at the next quote,
    followed by no comma), a ValueError naming the line the record began on. A quoted field over several lines,
    closed where it ends (RFC 4180, as pandas writes multi-paragraph captions), is read."""
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.DictReader(lines, strict=True)
    records: List[Tuple[int, Dict[Any, Any]]] = []
    end = 0  # the last line of the record before
    try:
        for row in itertools.chain([dict.fromkeys(reader.fieldnames or [])], reader):  # the header first
            records.append((_first_line(lines, end, reader.line_num), row))
            end = reader.line_num
    except csv.Error as err:  # an open quote; or past csv's field limit (128 KiB), one taking the rest of a file
        raise ValueError(f"line {_first_line(lines, end, len(lines))}: {err} ({_OPEN_QUOTE})") from None
    return records[1:]


def _first_line(lines: List[str], end: int, last: int) -> int:
    """A record's first line: the first non-empty one after line `end` (csv skips empty lines)."""
    return next((n for n in range(end + 1, last + 1) if lines[n - 1].strip("\r\n")), end + 1)


def parquet_captions(path: Path, what: str = "prompts") -> List[str]:
    """The `caption` column of a parquet file, each caption's line breaks and runs of spaces made one space (a
    text file would cut a multi-paragraph caption into several prompts; LongAlign's code removes its "\\n\\n"
    too), empty ones skipped, each once: a pair data set repeats a prompt per pair (about 14 times in Pick-a-Pic),
    which would sample it that many times more and count it as that many prompts in compare.py's statistics."""
    import pyarrow.parquet as pq

    from .data.pairs import text_column

    try:
        column = text_column(pq.read_table(path, columns=["caption"]), "caption")
    except (OSError, ValueError, KeyError) as err:  # not parquet (ArrowInvalid is a ValueError), no such column
        raise ConfigError(f"{what}: {path} has no readable caption column ({err}); give a parquet file with a "
                          "`caption` column, or a text file with one prompt per line") from None
    # not text (None, bytes that are not UTF-8, a list): skipped, as caption data sets skip them (str() would make
    # "b'...'" a prompt); UTF-8 bytes are text (text_column)
    texts = [" ".join(c.split()) for c in column if isinstance(c, str) and c.strip()]
    prompts = list(dict.fromkeys(texts))
    if not prompts:
        raise ConfigError(f"{what}: {path} holds no captions ({len(column)} rows, every caption empty or not text)")
    if len(texts) < len(column):
        logger.warning("%s: %d of %d rows of %s have no caption text; skipped", what, len(column) - len(texts),
                       len(column), path)
    if len(prompts) < len(texts):
        logger.info("%s: %d prompts from the %d captions of %s (repeats read once)", what, len(prompts), len(texts),
                    path)
    return prompts
