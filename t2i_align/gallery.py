"""Local image galleries (a PNG grid + an HTML table) that are never left half-written.

`save_grid` writes a temporary file in the destination folder and `os.replace`s it into place. `write_gallery`
builds the whole gallery in a temporary folder next to `out_dir` and swaps it in by two renames, so readers see
the old gallery or the new one, never a mix (between the two renames `out_dir` is briefly absent).
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .files import staged_dir, temp_file

ImageLike = Union[Image.Image, np.ndarray]

_CSS = """body { font-family: sans-serif; }
td { vertical-align: top; padding: 4px; } td.prompt { max-width: 320px; }
figure { margin: 0; text-align: center; } figcaption { font-size: 12px; }
img.small { image-rendering: pixelated; width: 128px; } .meta { color: #666; font-size: 11px; }"""


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 HWC / HW numpy array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be uint8 HW or HWC, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or uint8 numpy array, got {type(image).__name__}")
    return image.convert("RGB")


def to_uint8(images) -> List[np.ndarray]:
    """Accept PIL images, uint8 HWC arrays, a float tensor/array [B, 3, H, W] in [0, 1] or a uint8 tensor
    [B, 3, H, W] (values kept); return uint8 HWC arrays."""
    if hasattr(images, "detach") and not images.is_floating_point():  # uint8 pixels: not scaled again
        return list(np.ascontiguousarray(images.detach().cpu().numpy().astype(np.uint8).transpose(0, 2, 3, 1)))
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
        arr = np.ascontiguousarray(np.clip(images.transpose(0, 2, 3, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return list(arr)
    return [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]


def grid_image(images: Sequence[Optional[ImageLike]], ncols: Optional[int] = None, pad: int = 2) -> Image.Image:
    """Tile images row-major into one white-padded image of size (cols·(w+pad)+pad, rows·(h+pad)+pad), (w, h) the
    largest width and height: a smaller image sits at its cell's top left (a 512 px base beside a 1024 px tuned
    model in gallery.py).

    `ncols` defaults to ⌈√n⌉; a `None` entry leaves its cell blank (for rows of unequal length).
    """
    pil = [None if im is None else to_pil(im) for im in images]
    sizes = [im.size for im in pil if im is not None]
    if not sizes:
        raise ValueError("save_grid needs at least one image")
    (w, h), n = (max(s[0] for s in sizes), max(s[1] for s in sizes)), len(pil)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i, im in enumerate(pil):
        if im is not None:
            grid.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


def save_grid(images: Sequence[Optional[ImageLike]], path: Union[str, Path], ncols: Optional[int] = None,
              pad: int = 2) -> Path:
    """Tile images with `grid_image` and write a PNG atomically (temp file in the same folder + `os.replace`)."""
    path = Path(path)
    grid = grid_image(images, ncols, pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_rows(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]]) -> int:
    """Validate `rows` (prompt, images, matching captions); return the widest row's image count."""
    if not rows:
        raise ValueError("write_gallery needs at least one row")
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row.get("images"):
            raise ValueError(f"row {i} needs a str 'prompt' and a non-empty 'images' list")
        if len(row.get("captions", row["images"])) != len(row["images"]):
            raise ValueError(f"row {i}: {len(row['captions'])} captions for {len(row['images'])} images")
    width = max(len(row["images"]) for row in rows)
    if columns is not None and len(columns) != width:
        raise ValueError(f"{len(columns)} column headers for rows of up to {width} images")
    return width


def _html(rows: Sequence[Dict[str, Any]], files: List[List[str]], sizes: List[List[int]], title: str,
          columns: Optional[Sequence[str]]) -> str:
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><table>"]
    if columns is not None:
        out.append("<tr><th>prompt</th>" + "".join(f"<th>{esc(str(c))}</th>" for c in columns) + "</tr>")
    for row, names, widths in zip(rows, files, sizes):
        meta = "".join(f"<div class='meta'>{esc(str(k))}: {esc(str(v))}</div>"
                       for k, v in (row.get("meta") or {}).items())
        cells = [f"<td class='prompt'>{esc(row['prompt'])}{meta}</td>"]
        for name, width, caption in zip(names, widths, row.get("captions", [""] * len(names))):
            cls = " class='small'" if width < 128 else ""
            cells.append(f"<td><figure><a href='{name}'><img src='{name}'{cls} alt='{esc(str(caption))}'></a>"
                         f"<figcaption>{esc(str(caption))}</figcaption></figure></td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table></body></html>\n"])


def write_gallery(out_dir: Union[str, Path], rows: Sequence[Dict[str, Any]], title: str = "Gallery",
                  columns: Optional[Sequence[str]] = None, pad: int = 2) -> Path:
    """Write `out_dir/{images/<row>_<col>.png, grid.png, index.html}`, replacing any old gallery whole, with
    images/metadata.jsonl naming each image's prompt (and column): what `t2i-score --images OUT/images` reads.

    `rows`: dicts with "prompt" (str), "images" (PIL or uint8 HWC arrays, equal size), optional "captions"
    (one str per image, e.g. "judge 0.80") and "meta" (dict shown under the prompt). `columns`: optional
    headers (e.g. ["base", "tuned"]). Everything is escaped; images under 128 px wide are shown enlarged.
    """
    out_dir = Path(out_dir)
    width = _check_rows(rows, columns)
    with staged_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        files, sizes, cells, listing = [], [], [], []
        for r, row in enumerate(rows):
            pil = [to_pil(im) for im in row["images"]]
            for c, im in enumerate(pil):
                im.save(tmp / "images" / f"{r}_{c}.png")
                listing.append({"file": f"{r}_{c}.png", "prompt": str(row["prompt"]),
                                **({"column": columns[c]} if columns and c < len(columns) else {})})
            files.append([f"images/{r}_{c}.png" for c in range(len(pil))])
            sizes.append([im.width for im in pil])
            cells += pil + [None] * (width - len(pil))
        save_grid(cells, tmp / "grid.png", ncols=width, pad=pad)
        (tmp / "images" / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in listing),
                                                       encoding="utf-8")
        (tmp / "index.html").write_text(_html(rows, files, sizes, title, columns), encoding="utf-8")
    return out_dir
