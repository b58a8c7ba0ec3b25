"""Images of a data set: its parquet files found (one split's), opened and read with errors naming them, bytes
decoded to RGB (any PIL mode, EXIF orientation applied), then resized, flipped and cropped to the training
resolution with the SDXL micro-conditioning of where the crop fell."""
from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import ConfigError
from ..errors import UserError
from ..files import browser_leftover, shown

logger = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, struct.error, Image.DecompressionBombError)
"""What undecodable bytes raise in PIL (UnidentifiedImageError and truncation are OSErrors; a damaged EXIF block
struct.error, from exif_transpose)."""


def scalar_value(scalar):
    """A parquet scalar as Python; a string that is not UTF-8 (a path written by a tool that does not check) as
    None, which the row's reader counts as a bad row (it raised, stopping the run or the cache build)."""
    try:
        return scalar.as_py()
    except UnicodeDecodeError:
        return None


def as_text(value: Any) -> Any:
    """Bytes (text a tool wrote as binary) as UTF-8 text, None if they are not UTF-8; anything else as it is."""
    try:
        return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value
    except UnicodeDecodeError:
        return None


PIXEL_READING = 2
"""How image bytes become pixels (`decode_rgb`), in every latent cache's key: raise it with any change there. 1:
until session 37 (float images in [0, 1] then read black, too-thin ones were kept); 2: since."""

MAX_ASPECT = 32
"""Longest over shortest side of a trainable image: a square crop keeps 1/32 of it, and the resize before the crop
holds MAX_ASPECT·R² pixels (a 20000×1 PNG of 138 bytes would take 15 GB at 512 px)."""


def _import_hint(kind: str) -> str:
    return f"python -m t2i_align.data {kind} --from LISTING --out DIR writes DIR/{kind}.parquet from them"
_SPLIT_FILE = re.compile(r"([\w.]+?)-\d{5}-of-\d{5}(-[0-9a-f]+)?\.parquet")  # Hugging Face's shard names
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "eval", "dev")
"""Whole-split file names (train.parquet beside test.parquet)."""


def _split_of(name: str) -> Optional[str]:
    """The split a parquet file holds by its name (a shard's prefix, or a whole split's name), or None."""
    m = _SPLIT_FILE.fullmatch(name)
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else None
    return m.group(1) if m else stem if stem in _SPLIT_NAMES else None


def _one_split(folder: Path, files: List[Path]) -> None:
    """Refuse a folder whose files are shards of several splits (a Pick-a-Pic v2 download keeps train-*, test-*,
    validation-* side by side in data/): read whole, the test pairs were trained on without a word."""
    splits = sorted({split for f in files if (split := _split_of(f.name))})
    if len(splits) > 1:
        one = "train" if "train" in splits else splits[0]
        its = f"{one}.parquet" if (folder / f"{one}.parquet").is_file() else f"{one}-*.parquet"
        raise ConfigError(f"{folder} holds the shards of {len(splits)} splits ({', '.join(splits)}): read whole, "
                          f"they would be one data set; move each split into a folder of its own (mkdir "
                          f"{folder}/{one} && mv {folder}/{its} {folder}/{one}/) and give that folder")


def _parquet_in(folder: Path) -> List[Path]:
    """The *.parquet entries of `folder`, sorted; a folder that may not be read is a ConfigError naming it (glob took
    it for an empty one: "no *.parquet files")."""
    try:
        return sorted(f for f in folder.iterdir() if f.name.endswith(".parquet"))
    except PermissionError:
        raise ConfigError(f"folder {shown(folder)} cannot be read (permission denied): make it readable for this "
                          f"user (chmod a+rx {folder}), or copy the data to a folder it can read") from None


def find_parquet_files(path: str | Path, root: Optional[str | Path] = None, kind: str = "pairs") -> List[Path]:
    """A parquet file, or the *.parquet files of a folder (not recursive), all resolving inside `root`.

    `root` defaults to the folder (or the file's folder), so symlinks pointing elsewhere are rejected. `kind`
    ("pairs" or "captions"): which import the errors suggest for a listing.
    """
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"pair data {shown(given)} does not exist: set data.path to a Pick-a-Pic-format "
                                "parquet file or folder (toy world: make it first with python -m t2i_align.toy pairs "
                                "--out DIR --k 8 --pairing best-worst; PPD's toy users' pairs: python "
                                "benchmarks/toy_ppd.py data)")
    if given.suffix.lower() in (".jsonl", ".csv"):
        raise ConfigError(f"data {given} is a listing, not parquet: {_import_hint(kind)}")
    base = Path(root).resolve() if root is not None else given.resolve() if given.is_dir() else given.resolve().parent
    # macOS's ._* copies (a folder from a Mac or an exFAT drive) are no parquet: refused, they made the data unusable
    files = [f for f in _parquet_in(given) if not browser_leftover(f.name)] if given.is_dir() else [given]
    if not files:
        inside = _parquet_in(given / "data") if (given / "data").is_dir() else []
        where = (f"; its data/ subfolder holds {len(inside)} (a Hugging Face download): give {given / 'data'}"
                 if inside else f" (images listed in a JSONL or CSV file: {_import_hint(kind)})")
        raise ConfigError(f"no *.parquet files in folder {given}{where}")
    _one_split(given, files)
    found: Dict[Path, Path] = {}  # resolved -> as listed
    for f in files:
        real = f.resolve()
        if not real.is_relative_to(base):  # a data set may only read inside its folder
            cache = " (a Hugging Face cache links its snapshots into blobs/)" if "blobs" in real.parts else ""
            raise ConfigError(f"{f} resolves to {real}, outside the data root {base}{cache}: copy the files in "
                              "(cp -L), or download with `huggingface-cli download ... --local-dir DIR`")
        if not real.is_file():
            raise ConfigError(f"{f} is not a file")
        if real in found:  # a link to another file of the folder: its rows would be read twice
            logger.warning("%s and %s are one file (a link): read once", found[real], f)
            continue
        found[real] = f
    return list(found)


def grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greys as an 8-bit "L" image (PIL's convert would clip them): I;16 by its
    range (65535 -> 255, whatever its values: a dark image stays dark), I and F by 65535 when a value exceeds 255,
    F in [0, 1] by 255 when it fits there; other modes as they are. One rule for training and every reward (they
    disagreed: a dark 16-bit image read 257x too bright by some)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    arr = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16") or arr.max(initial=0) > 255:  # I or F beyond 8 bits: a 16-bit range
        arr = arr / 257.0
    elif image.mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1:
        arr = arr * 255.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")  # truncated, as PIL's F -> L


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white, 16-bit/int/float greys scaled to 8 bits."""
    image = grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


class DataReadError(UserError, OSError):
    """A parquet row group could not be read: the run stops. Counted as undecodable images, a passing I/O error
    would drop the group's rows, for good once a cache is built from them."""


READ_ERRORS = (OSError, ValueError)
"""What pyarrow raises for a damaged file: ArrowIOError is an OSError, ArrowInvalid a ValueError."""


def unreadable(path: Path, group: Optional[int], err: Exception) -> DataReadError:
    where = "" if group is None else f" row group {group}"
    return DataReadError(f"{path}:{where} could not be read ({err}); if the file is damaged, copy it again or leave "
                         "it out of data.path")


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """The parquet file at `path`, or a ConfigError naming it when it is none (pyarrow's own error names no file)."""
    import pyarrow

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise ConfigError(f"{path} is not a readable parquet file ({err}); data.path takes Pick-a-Pic-format "
                          "parquet files or a folder of them") from None


def read_group(pf, path: Path, group: int, columns: List[str]):
    """Row group `group` of the open ParquetFile `pf` (of `path`), or DataReadError naming them."""
    try:
        return pf.read_row_group(group, columns=columns)
    except READ_ERRORS as err:
        raise unreadable(path, group, err) from err


def checked_batches(batches: Iterator, path, group: Optional[int]) -> Iterator:
    """`batches` (pyarrow record batches of `path`) with a read error as DataReadError naming the file: a damaged
    page hours into training was a bare OSError naming nothing."""
    while True:
        try:
            record = next(batches)
        except StopIteration:
            return
        except READ_ERRORS as err:
            raise unreadable(path, group, err) from err
        yield record


OPEN_FILES = 16
"""ParquetFiles `read_row_group` keeps open per reader (the least recently read closed first): one per file of a
data set of thousands of shards reached the open-file limit (1024), "Too many open files" read as a damaged file."""


def read_row_group(handles: Dict[int, Any], files: Sequence[Path], fi: int, group: int, columns: List[str]):
    """Row group `group` of files[fi] (its ParquetFile kept in `handles`, at most OPEN_FILES of them), or
    DataReadError naming it."""
    try:
        if fi not in handles:
            while len(handles) >= OPEN_FILES:
                handles.pop(next(iter(handles))).close()
            handles[fi] = pq.ParquetFile(files[fi])
        else:
            handles[fi] = handles.pop(fi)  # the most recently read last
    except READ_ERRORS as err:
        raise unreadable(files[fi], group, err) from err
    return read_group(handles[fi], files[fi], group, columns)


def decode_rgb(data: Any) -> Image.Image:
    """Training's reading: `decode_image`, turned upright by its EXIF orientation, to RGB (`to_rgb`); an image
    longer than MAX_ASPECT times its width (or the reverse) is refused as undecodable."""
    return to_rgb(ImageOps.exif_transpose(check_aspect(decode_image(data), "train on")))


def check_aspect(image: Image.Image, use: str) -> Image.Image:
    """`image`, or ValueError when one side is more than MAX_ASPECT times the other: resizing its short side to
    the model's would make a huge image (a 1 x 100000 PNG of 375 bytes: 60 GB at 224 px)."""
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w}x{h} px: sides more than {MAX_ASPECT}:1 apart, too thin to {use}")
    return image


def decode_image(data: Any) -> Image.Image:
    """Image bytes (or an HF `Image` dict) decoded as stored, in their own mode: what the official reward scorers
    read (`Image.open`, then their own convert("RGB")), so t2i-score gives their scores. Except for palette and
    transparent images: the official CLIP, aesthetic and ImageReward transforms resize before converting (PIL then
    resizes a "P" image by nearest neighbour, RGBA premultiplied), the rewards here convert first: such images
    score a little differently from the official code's."""
    if isinstance(data, dict):  # HF `Image` feature layout: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if isinstance(data, str):
        raise ValueError(f"holds text ({data[:60]!r}), not image bytes: pair data keeps its images in the parquet "
                         "(python -m t2i_align.data pairs imports image files)")
    if not data:
        raise ValueError("no image bytes")
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: `check_pixels` refuses such images
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        raise ValueError(f"not an image format PIL reads (it starts {bytes(data[:8])!r})") from None
    check_pixels(image)
    image.load()
    return image


def check_pixels(image: Image.Image) -> None:
    """ValueError for an image over PIL's MAX_IMAGE_PIXELS (89 MP), before its pixels are read: PIL only warns up to
    twice that, and a 12000 x 12000 PNG of 1.3 MB took 1.6 GB to read and convert (a process killed for memory
    is no skipped row)."""
    w, h = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ValueError(f"{w}x{h} px: over {limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS), refused as a possible "
                         "decompression bomb; shrink it")


def _formats() -> List[str]:
    """The formats PIL opens (plugins such as pillow-heif's included), but EPS: PIL hands it to Ghostscript, a
    program with a history of code execution from crafted files, which a downloaded data set can hold."""
    Image.init()
    return [name for name in Image.OPEN if name != "EPS"]


def prepare_image(image: Image.Image, resolution: int, crop: str, flip: bool, u_y: float, u_x: float
                  ) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """Resize the shorter side to `resolution` (bilinear; long side truncated as torchvision), flip, crop.

    Returns pixels [3,R,R] in [-1,1], original_size (h, w) and crop_top_left (y, x) in the resized (flipped)
    image, the SDXL micro-conditioning of diffusers' SDXL scripts (PR #6668)."""
    w, h = image.size
    short = min(w, h)
    nw, nh = max(resolution, int(resolution * w / short)), max(resolution, int(resolution * h / short))
    image = image.resize((nw, nh), Image.BILINEAR)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if crop == "center":
        y, x = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    else:
        y, x = min(int(u_y * (nh - resolution + 1)), nh - resolution), min(int(u_x * (nw - resolution + 1)),
                                                                            nw - resolution)
    image = image.crop((x, y, x + resolution, y + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (h, w), (y, x)
