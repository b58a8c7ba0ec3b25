"""Image-caption data from local parquet files: LongAlign's stage 1 (Liu et al. 2024, arXiv 2410.11817, Sec. 5.1;
official code `unet_align_ct5.py`: the plain denoising loss on (image, long caption) pairs).

Columns: `caption` and either `jpg` (image bytes, or the Hugging Face `Image` layout {"bytes": ..., "path": ...})
or `path` (an image file relative to the image root, LongAlign's data layout: `path` + `caption`; the root
defaults to the parquet file's folder). Bad rows never end a run: an undecodable image, a missing file or a path
that leaves the image root (`../x.jpg`, an absolute path, a symlink pointing out) gives None, which
`collate_pairs` drops and counts (`skipped` per batch, summed by the loop as `data_rows_skipped`); the first few
are logged with the row. A row whose caption is missing (None) or not text is skipped and counted (`no_caption`),
as in pair data; an empty caption is used (unconditional). The parquet files themselves must resolve inside the
data root (`find_parquet_files`).

Items: pixels [3, R, R] in [-1, 1], caption ("" with probability `prompt_dropout`, the caption so blanked then in
dropped_caption), SDXL's original_size and
crop_top_left, index; resize, crop and flip as the pair loader (`images.prepare_image`), every random draw from
(seed, epoch, row id), so a resumed run sees the same items.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..config import ConfigError
from ..files import shown
from .images import DECODE_ERRORS, decode_rgb, open_parquet, prepare_image, read_group, read_row_group
from .images import PIXEL_READING, find_parquet_files, scalar_value
from .pairs import dropout_captions, files_identity, item_draws, text_column

logger = logging.getLogger(__name__)
IMAGE_COLUMNS = ("jpg", "path")
_MAX_WARNINGS = 5


@dataclass
class CaptionStats:
    """`rows` read (reading stops once max_items usable rows are found), `used` rows; `bad_images` found so far
    (undecodable, missing, or outside the image root); `no_caption`: skipped, caption None or not text."""

    rows: int = 0
    used: int = 0
    bad_images: int = 0
    no_caption: int = 0  # default: caches built before it was counted store stats without it

    def summary(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')}={v}" for k, v in asdict(self).items())

    def skipping(self, corrupt: int) -> "CaptionStats":
        """A copy with `corrupt` more unusable images (found at caching time) and as many fewer rows used."""
        return replace(self, bad_images=self.bad_images + corrupt, used=self.used - corrupt)


_READ = object()
"""`decode`'s default: read the row's image column from its file."""


class CaptionDataset(torch.utils.data.Dataset):
    """(image, caption) rows; item = dict(pixels, caption, dropped_caption, original_size, crop_top_left, index) or
    None."""

    SIDES = ("",)
    """One image per item: pixels (and its size and crop), cached as latents."""

    def __init__(self, path: str | Path, resolution: int = 512, crop: str = "center", flip: str = "none",
                 prompt_dropout: float = 0.0, max_items: int = 0, seed: int = 0, root: Optional[str | Path] = None,
                 image_root: Optional[str | Path] = None) -> None:
        self.files = find_parquet_files(path, root, kind="captions")
        self.resolution, self.crop, self.flip = resolution, crop, flip
        self.prompt_dropout, self.max_items, self.seed, self.epoch = prompt_dropout, max_items, seed, 0
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.stats = CaptionStats()
        self._read_metadata()
        if not len(self):
            raise ConfigError(f"no rows in {path}: expected parquet with a caption column and jpg or path "
                              f"({self.stats.summary()})")
        self._handles: Dict[int, pq.ParquetFile] = {}
        self._group_key: Optional[Tuple[int, int]] = None
        self._group: Any = None
        self._warnings = 0

    def _read_metadata(self) -> None:
        loc: List[Tuple[int, int, int]] = []
        self.captions: List[str] = []
        self.column: List[str] = []
        for fi, path in enumerate(self.files):
            if self.max_items and len(loc) >= self.max_items:
                break  # the last file filled it (each break below leaves one loop only)
            pf = open_parquet(path)
            image_col = caption_columns(pf.schema_arrow.names, path)
            self.column.append(image_col)
            for g in range(pf.num_row_groups):
                captions = text_column(read_group(pf, path, g, ["caption"]), "caption")
                for off, caption in enumerate(captions):
                    self.stats.rows += 1
                    if not isinstance(caption, str):  # None, or bytes that str() would make "b'...'"
                        self.stats.no_caption += 1
                        continue
                    loc.append((fi, g, off))
                    self.captions.append(caption)
                    if self.max_items and len(loc) >= self.max_items:
                        break
                if self.max_items and len(loc) >= self.max_items:
                    break
        self._loc = np.array(loc, dtype=np.int64).reshape(-1, 3)
        self.row_ids = np.arange(len(loc))  # each row's random draws come from its index
        self.stats.used = len(self.captions)

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def largest_byte_group(self) -> int:
        """Rows of the largest row group holding image bytes (a `jpg` column): what reading one item reads."""
        sizes = [meta.row_group(g).num_rows for f, col in zip(self.files, self.column) if col == "jpg"
                 for meta in [pq.read_metadata(f)] for g in range(meta.num_row_groups)]
        return max(sizes, default=0)

    def identity(self) -> Dict[str, Any]:
        """Everything that determines the pixels (cache key); the seed only if augmentation is random, the image
        files a `path` column names by their size and time (one replaced under its name was read from the cache)."""
        random = self.crop == "random" or self.flip != "none"
        # reading 2: rows without caption text skipped, image files turned upright by EXIF (older caches did neither);
        # 3: max_items counted over all files (one row more per further file before)
        images = {"image_files": self._image_files_digest()} if "path" in self.column else {}
        return {"kind": "captions", "files": files_identity(self.files), "image_root": str(self.image_root),
                "resolution": self.resolution, "crop": self.crop, "flip": self.flip, "max_items": self.max_items,
                "seed": self.seed if random else None, "reading": 3, "pixels": PIXEL_READING, **images}

    def _image_files_digest(self) -> str:
        """sha256 over each used row's image path, size and modification time (a stat per row, read when a cache
        key is made); a path that does not resolve to a file counts as missing. A stat per image is minutes for
        millions of files on a network drive: a bar, on the main process's terminal, once it lasts a second."""
        from tqdm.auto import tqdm

        digest = hashlib.sha256()
        main = os.environ.get("RANK", "0") == "0"  # every process makes the key; one bar (as run_cli's messages)
        for index in tqdm(range(len(self)), desc="hashing image files", unit="img", file=sys.stderr, delay=1,
                          disable=None if main else True):  # None: no bar when stderr is not a terminal (tests, logs)
            fi = int(self._loc[index, 0])
            if self.column[fi] != "path":
                continue
            rel = self._raw(index)
            root = self.image_root or self.files[fi].parent
            try:
                stat = (root / rel).stat() if isinstance(rel, str) and rel else None
            except (OSError, ValueError):
                stat = None
            digest.update(json.dumps([rel if isinstance(rel, str) else None,
                                      stat and [stat.st_size, stat.st_mtime_ns]]).encode())
        return digest.hexdigest()

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers reopen files themselves
        return {**self.__dict__, "_handles": {}, "_group_key": None, "_group": None}

    def _raw(self, index: int) -> Any:
        fi, g, off = (int(v) for v in self._loc[index])
        if self._group_key != (fi, g):
            self._group = read_row_group(self._handles, self.files, fi, g, [self.column[fi]]).column(0)
            self._group_key = (fi, g)
        return scalar_value(self._group[off])

    def _open_path(self, index: int, rel: Any) -> Image.Image:
        """The image file `rel` of row `index`, which must resolve inside the image root."""
        root = self.image_root or self.files[int(self._loc[index, 0])].parent
        if not isinstance(rel, str) or not rel:
            raise ValueError("no image path")
        try:
            real = (root / rel).resolve()
        except RuntimeError as err:  # a symlink loop: not a decode error, it would end the run
            raise ValueError(f"image path {rel!r} cannot be resolved ({err})") from None
        if not real.is_relative_to(root):
            raise ValueError(f"image path {rel!r} resolves to {real}, outside the image root {root}")
        if not real.is_file():  # a named pipe or device would block the read
            raise ValueError(f"image path {rel!r} is missing or not a regular file")
        return decode_rgb(real.read_bytes())  # as image bytes are: EXIF orientation applied

    def raw_columns(self, file: int) -> List[str]:
        """The column `item_from_raw` takes, of files[file] (a streaming reader reads it)."""
        return [self.column[file]]

    def locations(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: file number (into `files`), row group, and row offset within that group."""
        return self._loc[:, 0], self._loc[:, 1], self._loc[:, 2]

    def decode(self, index: int, raw: Any = _READ) -> Optional[Image.Image]:
        """Row `index`'s image as RGB (from its column's value `raw` if given, else read from the file), or None
        (logged, counted in `stats.bad_images`) if it cannot be used."""
        raw = self._raw(index) if raw is _READ else raw  # a row group that cannot be read stops the run
        try:
            if self.column[int(self._loc[index, 0])] == "path":
                return self._open_path(index, raw)
            return decode_rgb(raw)
        except DECODE_ERRORS as err:  # FileNotFoundError is an OSError
            self.stats.bad_images += 1
            self._warnings += 1
            log = logger.warning if self._warnings <= _MAX_WARNINGS else logger.debug
            log("caption row %d: unusable image, skipped: %s", index, err)
            return None

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index, self.decode(index))

    def item_from_raw(self, index: int, raw: Any) -> Optional[Dict[str, Any]]:
        """The item `dataset[index]` would give, from the row's image column value read by a streaming reader."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index, self.decode(index, raw))

    def _item(self, index: int, image: Optional[Image.Image]) -> Optional[Dict[str, Any]]:
        if image is None:
            return None
        u = item_draws(self.seed, self.epoch, int(self.row_ids[index]))
        flip = self.flip != "none" and u[1] < 0.5
        pixels, size, crop = prepare_image(image, self.resolution, self.crop, flip, u[3], u[4])
        return {"pixels": pixels, **dropout_captions(self.captions[index], u[0] < self.prompt_dropout),
                "original_size": size, "crop_top_left": crop, "index": index}


def caption_columns(names: List[str], path: Path) -> str:
    """The image column ("jpg" or "path") of image-caption data with these columns, or a ConfigError."""
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    if "caption" not in names or image_col is None:
        raise ConfigError(f"{path} is not image-caption data: it needs a caption column and a jpg (image "
                          f"bytes) or path (image file) column; found {names}")
    return image_col


def caption_files(cfg: Any, root: Optional[str | Path] = None, check_columns: bool = False) -> List[Path]:
    """The parquet files of data.path (data.kind = captions), or a ConfigError saying what to give; with
    `check_columns`, each file's columns too (its footer only: the dry run's check)."""
    if not cfg.path:
        raise ConfigError("data.path is empty: with data.kind=captions give a parquet file or folder with caption "
                          "and jpg (or path) columns (toy world: python -m t2i_align.toy captions --out DIR)")
    if not Path(cfg.path).exists():  # find_parquet_files' message is about pair data
        raise ConfigError(f"data.path: image-caption data {shown(cfg.path)} does not exist: give a parquet file or "
                          "folder with caption and jpg (or path) columns (toy world: python -m t2i_align.toy captions "
                          "--out DIR; a listing: python -m t2i_align.data captions)")
    files = find_parquet_files(cfg.path, root, kind="captions")
    for path in files if check_columns else []:
        caption_columns(open_parquet(path).schema_arrow.names, path)
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        raise ConfigError(f"data.image_root={shown(cfg.image_root)} is not a folder: give the folder the image paths "
                          "of data.path are relative to")
    _check_image_paths(cfg, files)
    return files


def _check_image_paths(cfg: Any, files: List[Path], n: int = 8) -> None:
    """ConfigError when none of the first `n` paths of the first file with a `path` column names a file inside
    its image root (metadata kept apart from its images): the run read an epoch of skipped rows, then blamed the
    images' decoding."""
    first = next((f for f in files if caption_columns(open_parquet(f).schema_arrow.names, f) == "path"), None)
    pf = None if first is None else open_parquet(first)
    if pf is None or pf.metadata.num_row_groups == 0:
        return
    root = Path(cfg.image_root or first.parent).resolve()
    paths = [p for p in text_column(read_group(pf, first, 0, ["path"]), "path")[:n] if isinstance(p, str) and p]
    found = [p for p in paths if (root / p).resolve().is_relative_to(root) and (root / p).is_file()]  # as the run
    if paths and not found:
        raise ConfigError(f"data.path: none of the first {len(paths)} image paths of {first.name} is a file inside "
                          f"the image root {root} (e.g. {paths[0]!r}), so the rows would be skipped: set "
                          "data.image_root to the folder they are relative to, or write them relative to the parquet "
                          "file's folder")


def load_captions(cfg: Any, seed: int, root: Optional[str | Path] = None) -> CaptionDataset:
    """CaptionDataset from a `DataConfig` (data.kind = captions)."""
    caption_files(cfg, root)
    try:
        return CaptionDataset(cfg.path, resolution=cfg.resolution, crop=cfg.crop, flip=cfg.flip,
                              prompt_dropout=cfg.prompt_dropout, max_items=cfg.max_pairs, seed=seed, root=root,
                              image_root=cfg.image_root)
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}; give a parquet file or folder of image-caption data") from None


def build_caption_source(cfg: Any, components: Any, accelerator: Any):
    """Image-caption micro-batches for an "images" objective (SFT: LongAlign stage 1), in `OfflineSource` order:
    each process its share, resumable by skipping micro-batches; read and encoded every step, or with data.cache
    from latents and embeddings encoded once (cache.py)."""
    from .pairs import collate_pairs
    from ..engines import say
    from .sources import OfflineSource, cached_data, report_rows, same_rows_everywhere

    dataset = load_captions(cfg.data, cfg.seed)
    if cfg.data.cache:
        dataset = cached_data(cfg, components, accelerator, dataset)
    else:
        same_rows_everywhere(accelerator, dataset)
        if (group := dataset.largest_byte_group()) > 16:
            say(accelerator, f"note: data.path keeps image bytes in row groups of up to {group} rows and data.cache "
                             "is off: every shuffled item reads its whole row group again (that many times the bytes). "
                             "For real data set data.cache=true (read and encoded once)")
    report_rows(accelerator, cfg.data.path, dataset.stats, cached=cfg.data.cache)
    return OfflineSource(dataset, collate_pairs, cfg.train.batch_size, cfg.seed, accelerator.process_index,
                         accelerator.num_processes, cfg.data.num_workers)
