"""t2i_align.gallery: files and sizes, escaping, whole replacement, and no half-written gallery on failure."""
import json

import numpy as np
import pytest
from PIL import Image

from t2i_align.gallery import save_grid, write_gallery

PROMPT = "a <b>red</b> cube & a sphere"


def _rows(color):
    solid = lambda c: Image.new("RGB", (32, 24), c)  # noqa: E731
    return [
        {"prompt": PROMPT, "images": [solid(color), solid("blue")], "captions": ["base · 0.60", "judge 0.80"],
         "meta": {"seed": 7}},
        {"prompt": "two cats", "images": [np.zeros((24, 32, 3), np.uint8), solid(color)],
         "captions": ["base · 0.10", "judge <0.9>"]},
    ]


def _siblings(out_dir):
    return sorted(p.name for p in out_dir.parent.iterdir())


def test_gallery_files_grid_size_and_escaped_html(tmp_path):
    out = write_gallery(tmp_path / "gallery", _rows("red"), title="toy", columns=["base", "tuned"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png",
                                                                  "metadata.jsonl"]
    # what `t2i-score --images gallery/images` reads: sorted as text, 10_0.png came before 2_0.png (a wrong prompt)
    listing = [json.loads(line) for line in (out / "images" / "metadata.jsonl").read_text().splitlines()]
    assert listing[1] == {"file": "0_1.png", "prompt": PROMPT, "column": "tuned"}
    assert [(x["file"], x["prompt"]) for x in listing[2:]] == [("1_0.png", "two cats"), ("1_1.png", "two cats")]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * (32 + 2) + 2, 2 * (24 + 2) + 2)
        assert grid.getpixel((2, 2)) == (255, 0, 0) and grid.getpixel((0, 0)) == (255, 255, 255)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "a &lt;b&gt;red&lt;/b&gt; cube &amp; a sphere" in page and "<b>red" not in page
    assert "base · 0.60" in page and "judge 0.80" in page and "judge &lt;0.9&gt;" in page
    assert "<th>base</th><th>tuned</th>" in page and "seed: 7" in page
    assert "image-rendering: pixelated" in page and "src='images/1_1.png'" in page
    assert _siblings(out) == ["gallery"]


def test_writing_over_a_gallery_replaces_it_whole(tmp_path):
    out = write_gallery(tmp_path / "gallery", _rows("red"))
    (out / "stale.txt").write_text("from the old gallery")
    write_gallery(out, [{"prompt": "only one", "images": [Image.new("RGB", (8, 8), "green")]}])
    assert not (out / "stale.txt").exists() and not (out / "images" / "1_0.png").exists()
    assert "only one" in (out / "index.html").read_text(encoding="utf-8")
    assert _siblings(out) == ["gallery"]


def test_a_gallery_that_is_a_link_is_written_where_it_points(tmp_path):
    """A resumed run's gallery/ linked to another disk: the rename onto it failed ("Is a directory") at the first
    gallery, or after the last step at the export; now the linked folder is replaced and the link kept."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "stale.txt").write_text("old")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "gallery").symlink_to(tmp_path / "disk")
    write_gallery(tmp_path / "run" / "gallery", _rows("red"))
    assert (tmp_path / "run" / "gallery").is_symlink() and (tmp_path / "disk" / "index.html").is_file()
    assert not (tmp_path / "disk" / "stale.txt").exists() and _siblings(tmp_path / "disk") == ["disk", "run"]


def test_failure_midway_keeps_previous_gallery(tmp_path, monkeypatch):
    out = write_gallery(tmp_path / "gallery", _rows("red"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_gallery(out, _rows("green"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and _siblings(out) == ["gallery"]


def test_save_grid_default_layout_blank_cells_and_errors(tmp_path):
    images = [Image.new("RGB", (10, 10), "red")] * 5
    path = save_grid(images, tmp_path / "sub" / "g.png")  # ceil(sqrt 5) = 3 columns, 2 rows
    with Image.open(path) as grid:
        assert grid.size == (3 * 12 + 2, 2 * 12 + 2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.png"]
    # sides of two sizes (gallery.py: a 512 px base beside a 1024 px model) failed after all the sampling
    mixed = save_grid([Image.new("RGB", (10, 6), "red"), Image.new("RGB", (8, 10), "blue")], tmp_path / "m.png", 2)
    with Image.open(mixed) as grid:
        assert grid.size == (2 * 12 + 2, 12 + 2)  # cells of the largest width and height
        assert grid.getpixel((2, 2)) == (255, 0, 0) and grid.getpixel((2, 9)) == (255, 255, 255)
        assert grid.getpixel((14, 11)) == (0, 0, 255)
    with pytest.raises(ValueError, match="uint8"):
        save_grid([np.zeros((4, 4, 3), np.float32)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="captions"):
        write_gallery(tmp_path / "g", [{"prompt": "p", "images": images[:2], "captions": ["one"]}])
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "g").exists()


def test_failure_during_the_swap_puts_the_old_gallery_back(tmp_path, monkeypatch):
    import t2i_align.gallery as gallery

    out = write_gallery(tmp_path / "gallery", _rows("red"))
    before = (out / "index.html").read_text(encoding="utf-8")
    real_replace = gallery.os.replace

    def failing_replace(src, dst):
        if str(src).startswith(str(tmp_path / ".gallery.tmp-")) and str(dst) == str(out):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(gallery.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed.*the new contents are kept whole in .*gallery.unpublished"):
        write_gallery(out, _rows("green"), title="new")
    assert (out / "index.html").read_text(encoding="utf-8") == before
    assert _siblings(out) == ["gallery", "gallery.unpublished"]  # the new one kept, visible (files.staged_dir)
    assert "new" in (tmp_path / "gallery.unpublished" / "index.html").read_text(encoding="utf-8")


def test_uint8_image_tensors_keep_their_values():
    """A uint8 [B, 3, H, W] tensor was scaled by 255 again (100 became 255), so toy-judge scored other pixels."""
    import torch

    from t2i_align.gallery import to_uint8

    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = to_uint8(pixels)
    assert out[1].shape == (4, 5, 3) and (out[1] == pixels[1].permute(1, 2, 0).numpy()).all()
    assert (to_uint8(pixels.float() / 255)[1] == out[1]).all()
