"""Pick-a-Pic-format pair loading: ties, swaps, decoding, SDXL sizes/crops, flips, seeding, corrupt rows, paths."""
import io
import logging
import sys
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from t2i_align.config import DataConfig
from t2i_align.data.images import decode_rgb
from t2i_align.data.pairs import PairDataset, collate_pairs, item_draws, load_pairs, scan_corrupt

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def image_bytes(color=RED, size=(16, 16), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_pairs(path, rows, row_group_size=None):
    """rows: dicts with caption, jpg_0, jpg_1, label_0 (+ any other column)."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def row(caption="a cat", jpg_0=None, jpg_1=None, label_0=1.0, **extra):
    return {"caption": caption, "jpg_0": jpg_0 or image_bytes(RED), "jpg_1": jpg_1 or image_bytes(BLUE),
            "label_0": label_0, **extra}


def color_of(pixels: torch.Tensor):
    return tuple(int(round(v)) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def is_flipped(pixels: torch.Tensor) -> bool:
    """For the left-red / right-blue test image."""
    return bool(pixels[2, :, 0].mean() > pixels[0, :, 0].mean())


def test_a_row_group_that_cannot_be_read_stops_rather_than_counting_its_rows_corrupt(tmp_path, monkeypatch):
    """An I/O error (EIO, a network file system hiccup) made every row of the group an "undecodable" pair, and a
    cache built then left them out for good."""
    from t2i_align.data.captions import CaptionDataset
    from t2i_align.data.images import DataReadError

    path = write_pairs(tmp_path / "p.parquet", [row(caption=f"c{i}") for i in range(3)])
    (tmp_path / "c").mkdir()
    caption_file = write_pairs(tmp_path / "c" / "p.parquet", [{"caption": "c", "jpg": image_bytes(RED)}])
    pairs, captions = PairDataset(path, resolution=16), CaptionDataset(caption_file, resolution=16)

    def eio(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", eio)
    for ds in (pairs, captions):
        with pytest.raises(DataReadError, match=r"p\.parquet: row group 0 could not be read .*Input/output error"):
            ds[0]
    assert pairs.stats.corrupt == 0 and captions.stats.bad_images == 0
    # the metadata pass (captions, labels) and the streaming reader's record batches: a bare OSError naming no file
    for make in (partial(PairDataset, path), partial(CaptionDataset, caption_file)):
        with pytest.raises(DataReadError, match=r"p\.parquet: row group 0 could not be read"):
            make(resolution=16)
    from t2i_align.data.stream import RowReader

    def eio_batches(self, *args, **kwargs):
        yield from ()
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", eio_batches)
    with pytest.raises(DataReadError, match=r"p\.parquet: row group 0 could not be read .*Input/output error"):
        list(RowReader(pairs).rows([0, 1]))
    path.write_bytes(b"PAR1 truncated")  # replaced since the data set was opened
    with pytest.raises(DataReadError, match=r"p\.parquet: could not be read"):
        list(RowReader(pairs).rows([0, 1]))


def test_ties_dropped_and_counted_and_losers_swapped(tmp_path, caplog):
    rows = [row(label_0=1.0, has_label=True),
            row(jpg_0=image_bytes(BLUE), jpg_1=image_bytes(RED), label_0=0.0, has_label=True),
            row(label_0=0.5, has_label=True), row(label_0=1.0, has_label=False)]
    path = write_pairs(tmp_path / "p.parquet", rows)
    with caplog.at_level(logging.INFO, logger="t2i_align.data.pairs"):
        ds = PairDataset(path, resolution=8)
    assert "ties dropped=1" in caplog.text
    assert len(ds) == 2
    assert (ds.stats.rows, ds.stats.used, ds.stats.ties_dropped, ds.stats.ties_kept, ds.stats.unlabelled) == (
        4, 2, 1, 0, 1)
    for i in range(2):
        assert color_of(ds[i]["pixels_w"]) == RED and color_of(ds[i]["pixels_l"]) == BLUE


def test_labels_outside_0_1_are_skipped_and_counted_like_nan(tmp_path, caplog):
    """Regression (issue 10, bug 6): label_0 = 3.0 used to be taken as "image 0 wins"."""
    bad = [3.0, -1.0, float("inf"), float("nan"), 1.5]
    rows = [row(caption="good 1", label_0=1.0), row(caption="good 0", label_0=0.0)]
    rows += [row(caption=f"bad {v}", label_0=v) for v in bad] + [row(caption="unlabelled", has_label=False)]
    rows[0]["has_label"] = rows[1]["has_label"] = True
    for r in rows[2:-1]:
        r["has_label"] = True
    with caplog.at_level(logging.INFO, logger="t2i_align.data.pairs"):
        ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)
    assert ds.captions == ["good 1", "good 0"]
    assert (ds.stats.rows, ds.stats.used, ds.stats.invalid_labels, ds.stats.unlabelled) == (8, 2, 5, 1)
    assert "invalid labels=5" in caplog.text
    everything_bad = [row(label_0=v) for v in bad]
    with pytest.raises(ValueError, match="no usable pairs.*invalid labels=5"):
        PairDataset(write_pairs(tmp_path / "bad.parquet", everything_bad), resolution=8)


def test_missing_captions_are_skipped_and_counted(tmp_path):
    """A None caption was trained on as "" (unconditionally), silently; empty strings stay allowed (below)."""
    rows = [row(caption="good"), row(caption=None), row(caption="also good")]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)
    assert ds.captions == ["good", "also good"]
    assert (ds.stats.rows, ds.stats.used, ds.stats.no_caption) == (3, 2, 1)
    numbers = [row(caption=7)]  # a caption column of numbers is no caption either
    with pytest.raises(ValueError, match="no usable pairs.*no caption=1"):
        PairDataset(write_pairs(tmp_path / "n.parquet", numbers), resolution=8)


def test_a_has_label_of_zero_is_unlabelled_whatever_its_type(tmp_path):
    """A pandas round trip turns a bool has_label with nulls into floats: 0.0 was taken as labelled."""
    from t2i_align.data.pairs import label_problem

    assert [label_problem(1.0, h) for h in (False, 0, 0.0, True, 1, 1.0, None, float("nan"))] == [
        "unlabelled"] * 3 + [None] * 5  # None / NaN (a null): label_0 decides
    rows = [row(caption=c, has_label=h) for c, h in (("one", 1.0), ("zero", 0.0), ("null", None))]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)
    assert ds.captions == ["one", "null"] and (ds.stats.rows, ds.stats.used, ds.stats.unlabelled) == (3, 2, 1)


def test_ties_first_keeps_jpg_0_as_winner(tmp_path):
    rows = [row(label_0=1.0), row(jpg_0=image_bytes(GREEN), label_0=0.5)]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8, ties="first")
    assert len(ds) == 2 and ds.stats.ties_kept == 1 and ds.stats.ties_dropped == 0
    assert color_of(ds[1]["pixels_w"]) == GREEN and color_of(ds[1]["pixels_l"]) == BLUE


def test_both_models_contain_keeps_only_pairs_of_those_generators(tmp_path):
    """The official `--dreamlike_pairs_only`: 'dream' in both model_0 and model_1; the rest skipped and counted."""
    dream, xl = "dreamlike-art/dreamlike-photoreal-2.0", "stabilityai/stable-diffusion-xl-beta"
    rows = [row(caption="both", model_0=dream, model_1=dream), row(caption="one", model_0=dream, model_1=xl),
            row(caption="none", model_0=xl, model_1=xl), row(caption="unnamed", model_0=None, model_1=dream),
            row(caption="tie", label_0=0.5, model_0=dream, model_1=dream),
            row(caption="swapped", label_0=0.0, model_0=dream, model_1=dream)]
    path = write_pairs(tmp_path / "p.parquet", rows)
    ds = PairDataset(path, resolution=8, both_models_contain="dream")
    assert ds.captions == ["both", "swapped"]
    assert (ds.stats.rows, ds.stats.used, ds.stats.other_models, ds.stats.ties_dropped) == (6, 2, 3, 1)
    assert ds.identity()["both_models_contain"] == "dream"
    every = load_pairs(DataConfig(path=str(path), resolution=8), seed=0)
    assert len(every) == 5 and every.stats.other_models == 0 and "both_models_contain" not in every.identity()
    assert len(load_pairs(DataConfig(path=str(path), resolution=8, both_models_contain="xl"), seed=0)) == 1


def test_a_joint_random_crop_is_keyed_apart_from_caches_made_before_it(tmp_path):
    """flip=joint with crop=random began cropping both images at one place without a new cache key: a cache built
    before kept each image's own crop and was reused. Other settings keep their key (their caches stay valid)."""
    path = write_pairs(tmp_path / "p.parquet", [row()])
    readings = {(flip, crop): PairDataset(path, resolution=8, flip=flip, crop=crop).identity()["reading"]
                for flip in ("none", "joint") for crop in ("center", "random")}
    assert readings == {("none", "center"): 2, ("none", "random"): 2, ("joint", "center"): 2, ("joint", "random"): 3}


def test_both_models_contain_needs_the_model_columns(tmp_path):
    path = write_pairs(tmp_path / "p.parquet", [row()])
    with pytest.raises(ValueError, match="model_0 and model_1.*leave data.both_models_contain empty"):
        PairDataset(path, resolution=8, both_models_contain="dream")


def test_row_groups_and_max_pairs(tmp_path):
    rows = [row(caption=f"c{i}", jpg_0=image_bytes((10 * i, 0, 0)), label_0=1.0) for i in range(7)]
    path = write_pairs(tmp_path / "p.parquet", rows, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 4
    ds = PairDataset(path, resolution=8)
    for i in [6, 0, 3, 4, 1]:  # out of order, across row groups
        item = ds[i]
        assert item["caption"] == f"c{i}" and color_of(item["pixels_w"])[0] == 10 * i and item["index"] == i
    limited = PairDataset(path, resolution=8, max_pairs=3)
    assert len(limited) == 3 and limited.stats.used == 3 and limited.captions == ["c0", "c1", "c2"]


def test_any_mode_decodes_to_rgb():
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(buf, format="PNG")
    cases = {
        "cmyk": (image_bytes((0, 0, 0, 0), mode="CMYK", fmt="JPEG"), (255, 255, 255)),
        "grey": (image_bytes(128, mode="L"), (128, 128, 128)),
        "rgba transparent": (image_bytes((255, 0, 0, 0), mode="RGBA"), (255, 255, 255)),
        "rgba opaque": (image_bytes((255, 0, 0, 255), mode="RGBA"), RED),
        "16-bit": (buf.getvalue(), (255, 255, 255)),
    }
    palette = io.BytesIO()
    Image.new("RGB", (8, 8), GREEN).convert("P").save(palette, format="PNG")
    cases["palette"] = (palette.getvalue(), GREEN)
    for name, (data, expected) in cases.items():
        image = decode_rgb(data)
        assert image.mode == "RGB", name
        got = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0).round())
        assert all(abs(a - b) <= 2 for a, b in zip(got, expected)), (name, got)


def test_different_sizes_and_modes_give_equal_tensors_and_true_sdxl_sizes(tmp_path):
    tall = image_bytes(RED, size=(32, 64))  # PIL size is (w, h): h=64, w=32
    wide = image_bytes((0, 0, 255, 128), size=(64, 32), mode="RGBA")
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", [row(jpg_0=tall, jpg_1=wide)]), resolution=16)
    item = ds[0]
    assert item["pixels_w"].shape == item["pixels_l"].shape == (3, 16, 16)
    assert item["pixels_w"].min() >= -1 and item["pixels_w"].max() <= 1
    # tall: resized to h=32, w=16 -> center crop at y=(32-16)/2=8, x=0. wide: the transpose.
    assert item["original_size_w"] == (64, 32) and item["crop_top_left_w"] == (8, 0)
    assert item["original_size_l"] == (32, 64) and item["crop_top_left_l"] == (0, 8)


def test_crop_content_and_random_crop_bounds(tmp_path):
    arr = np.zeros((64, 32, 3), dtype=np.uint8)
    arr[:8] = RED  # top eighth red: after the resize (h=32) rows 0..3 red, the center crop (y=8..23) has none
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", [row(jpg_0=buf.getvalue())] * 8), resolution=16)
    assert color_of(ds[0]["pixels_w"]) == (0, 0, 0)
    rand = PairDataset(tmp_path / "p.parquet", resolution=16, crop="random")
    crops = {rand[i]["crop_top_left_w"] for i in range(8)}
    assert all(0 <= y <= 16 and x == 0 for y, x in crops) and len(crops) > 1


def asymmetric() -> bytes:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8] = RED
    arr[:, 8:] = BLUE
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_joint_flip_same_for_both_independent_can_differ(tmp_path):
    path = write_pairs(tmp_path / "p.parquet", [row(caption=str(i), jpg_0=asymmetric(), jpg_1=asymmetric())
                                                for i in range(12)])
    joint = PairDataset(path, resolution=16, flip="joint")
    flips = [(is_flipped(it["pixels_w"]), is_flipped(it["pixels_l"])) for it in map(joint.__getitem__, range(12))]
    assert all(win == lose for win, lose in flips) and {w for w, _ in flips} == {True, False}
    independent = PairDataset(path, resolution=16, flip="independent")
    flips = [(is_flipped(it["pixels_w"]), is_flipped(it["pixels_l"])) for it in map(independent.__getitem__,
                                                                                       range(12))]
    assert any(win != lose for win, lose in flips)
    none = PairDataset(path, resolution=16)
    assert not any(is_flipped(none[i]["pixels_w"]) for i in range(12))
    # diffusers' SDXL script crops the pair at one place too; random crops were drawn per image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 48, 3), dtype=np.uint8)).save(buf, format="PNG")  # wide: crops can move
    wide = write_pairs(tmp_path / "wide.parquet", [row(caption=str(i), jpg_0=buf.getvalue(), jpg_1=buf.getvalue())
                                                   for i in range(12)])
    crops = [(it["crop_top_left_w"], it["crop_top_left_l"]) for it in
             map(PairDataset(wide, resolution=8, crop="random", flip="joint").__getitem__, range(12))]
    assert all(w == lo for w, lo in crops) and len({w for w, _ in crops}) > 1


def test_items_reproducible_by_seed_epoch_index(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    path = write_pairs(tmp_path / "p.parquet", [row(caption=str(i), jpg_0=buf.getvalue()) for i in range(4)])
    kwargs = dict(resolution=16, crop="random", flip="independent", seed=3)
    a, b = PairDataset(path, **kwargs), PairDataset(path, **kwargs)
    for i in range(4):
        x, y = a[i], b[i]
        assert torch.equal(x["pixels_w"], y["pixels_w"]) and x["crop_top_left_w"] == y["crop_top_left_w"]
    before = [a[i]["crop_top_left_w"] for i in range(4)]
    a.set_epoch(1)
    assert [a[i]["crop_top_left_w"] for i in range(4)] != before
    a.set_epoch(0)
    assert [a[i]["crop_top_left_w"] for i in range(4)] == before


def test_corrupt_rows_are_dropped_by_collate_and_counted(tmp_path):
    truncated = image_bytes(RED, fmt="JPEG")[:40]
    rows = [row(), row(jpg_1=b"not an image"), row(jpg_0=truncated), row()]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)
    assert ds[1] is None and ds[2] is None
    batch = collate_pairs([ds[0], ds[1], ds[3]])
    assert batch["skipped"] == 1 and batch["pixels_w"].shape == (2, 3, 8, 8)
    assert batch["caption"] == ["a cat", "a cat"] and batch["index"].tolist() == [0, 3]
    assert batch["original_size_w"].shape == (2, 2) and batch["crop_top_left_l"].dtype == torch.long
    assert collate_pairs([ds[1], ds[2]]) is None
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_pairs)
    assert [b["skipped"] for b in loader] == [1, 1]
    assert scan_corrupt(ds) == 2 and len(ds) == 2 and ds.stats.corrupt == 2 and ds.stats.used == 2
    assert ds[1]["index"] == 1 and color_of(ds[1]["pixels_w"]) == RED


def test_missing_column_lists_found_and_expected(tmp_path):
    path = write_pairs(tmp_path / "p.parquet", [{"caption": "x", "jpg_0": b"", "jpg_1": b""}])
    with pytest.raises(ValueError, match=r"label_0.*expected.*found \['caption', 'jpg_0', 'jpg_1'\]") as err:
        PairDataset(path)
    assert "p.parquet" in str(err.value)


def test_image_paths_or_text_labels_are_refused_by_their_column_type(tmp_path):
    """Text in jpg_0 (paths) or label_0 passed every check, the dry run's included, and every row was unusable
    once the model had loaded; a datasets Image column (a struct holding the bytes) is taken."""
    base = {"caption": "x", "jpg_0": image_bytes(), "jpg_1": image_bytes(BLUE), "label_0": 1.0}
    for change, told in (({"jpg_0": "images/a.png"}, "column jpg_0 holds string, not image bytes .file paths.."),
                         ({"label_0": "1"}, "column label_0 holds string, not numbers")):
        path = write_pairs(tmp_path / "bad.parquet", [dict(base, **change)])
        with pytest.raises(ValueError, match=told):
            PairDataset(path, resolution=8)
    image = {"bytes": image_bytes(), "path": None}
    path = write_pairs(tmp_path / "hf.parquet", [dict(base, jpg_0=image, jpg_1=dict(image), label_0=1)])
    assert len(PairDataset(path, resolution=8)) == 1
    table = pa.Table.from_pylist([base, base])  # dictionary-encoded (repeated images and labels) reads as values
    table = table.set_column(1, "jpg_0", table.column("jpg_0").dictionary_encode())
    pq.write_table(table.set_column(3, "label_0", table.column("label_0").dictionary_encode()), tmp_path / "d.parquet")
    assert len(PairDataset(tmp_path / "d.parquet", resolution=8)) == 2


def test_paths_must_stay_inside_root_and_folders_need_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ValueError, match="no \\*.parquet"):
        PairDataset(data)
    outside = write_pairs(tmp_path / "outside.parquet", [row()])
    with pytest.raises(ValueError, match="outside the data root"):
        PairDataset(data / ".." / "outside.parquet", root=data)
    (data / "link.parquet").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the data root .*: copy the files in .cp -L."):
        PairDataset(data)
    with pytest.raises(FileNotFoundError):
        PairDataset(tmp_path / "missing.parquet")
    # a Hugging Face download's root (its shards in data/), and its cache's snapshot links into blobs/
    download = tmp_path / "download"
    (download / "blobs").mkdir(parents=True)
    write_pairs(download / "blobs" / "0a1b", [row()])
    (download / "data").mkdir()
    (download / "data" / "train-00000-of-00001.parquet").symlink_to(download / "blobs" / "0a1b")
    with pytest.raises(ValueError, match=f"its data/ subfolder holds 1 .a Hugging Face download.: give {download}/"):
        PairDataset(download)
    with pytest.raises(ValueError, match=r"outside the data root .* \(a Hugging Face cache links its snapshots into "
                                         r"blobs/\)"):
        PairDataset(download / "data")
    from t2i_align.data.images import find_parquet_files

    (tmp_path / "l.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="python -m t2i_align.data captions --from LISTING"):  # it said `pairs`
        find_parquet_files(tmp_path / "l.jsonl", kind="captions")


def test_a_folder_that_may_not_be_read_is_named_not_taken_for_empty(tmp_path, monkeypatch):
    """Path.glob swallowed a PermissionError: a folder (or its data/ subfolder) the user may not list was "no
    *.parquet files". Listing is denied by a patch: chmod denies nothing to root, which tests may run as."""
    import os
    from pathlib import Path

    from t2i_align.data.images import find_parquet_files

    denied = set()

    def refusing(real):
        def listing(path="."):
            if Path(path) in denied:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        return listing
    for name in ("listdir", "scandir"):  # what Path.iterdir and Path.glob call, by Python version
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "a.parquet", [row()])
    for folder in (tmp_path / "data", tmp_path):  # the folder given, then the data/ subfolder the hint looks in
        denied.add(tmp_path / "data")
        with pytest.raises(ValueError, match=f"folder {tmp_path / 'data'} cannot be read \\(permission denied\\)"):
            find_parquet_files(folder)
    denied.clear()
    assert find_parquet_files(tmp_path / "data") == [tmp_path / "data" / "a.parquet"]


def test_a_folder_of_several_splits_shards_is_refused(tmp_path):
    """A Pick-a-Pic v2 download keeps train-*, test-*, validation_unique-* shards side by side in data/: read whole,
    its test pairs were trained on (rows=48, used=48 for three splits of 16) without a word."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-00000-of-00002-0a1b.parquet", "train-00001-of-00002-0a1b.parquet",
                 "test-00000-of-00001.parquet", "validation_unique-00000-of-00001-ff.parquet"):
        write_pairs(data / name, [row()])
    with pytest.raises(ValueError, match=r"holds the shards of 3 splits \(test, train, validation_unique\): .*mkdir "
                       rf"{data}/train && mv {data}/train-\*.parquet {data}/train/\)"):
        PairDataset(data)
    for name in ("test-00000-of-00001.parquet", "validation_unique-00000-of-00001-ff.parquet"):
        (data / name).unlink()
    write_pairs(data / "extra.parquet", [row()])  # one split's shards beside other files: read as before
    assert len(PairDataset(data)) == 3
    whole = tmp_path / "whole"  # whole splits by name, side by side, as well
    whole.mkdir()
    for name in ("train.parquet", "test.parquet"):
        write_pairs(whole / name, [row()])
    with pytest.raises(ValueError, match=rf"holds the shards of 2 splits \(test, train\).* mv {whole}/train.parquet "):
        PairDataset(whole)


def test_a_caption_that_is_not_utf8_is_a_missing_caption_not_a_failed_file(tmp_path):
    """Parquet from a writer that does not check UTF-8: reading the column raised UnicodeDecodeError at start."""
    texts = [b"a cat", b"caf\xff", b"a dog"]
    offsets = pa.array([0, 5, 9, 14], pa.int32()).buffers()[1]
    captions = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"".join(texts))])
    rows = [row() for _ in texts]
    table = pa.Table.from_pylist(rows).set_column(0, "caption", captions)
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    ds = PairDataset(path)
    assert ds.captions == ["a cat", "a dog"] and ds.stats.no_caption == 1


def test_a_binary_caption_column_is_decoded_as_text(tmp_path):
    """Captions written as bytes (pa.binary()) were all "no caption": no usable pairs. Now UTF-8 bytes are text,
    others a missing caption."""
    rows = [row() for _ in range(3)]
    captions = pa.array([b"a cat", b"caf\xff", b"a dog"], pa.binary())
    table = pa.Table.from_pylist(rows).set_column(0, "caption", captions)
    pq.write_table(table, tmp_path / "p.parquet")
    ds = PairDataset(tmp_path / "p.parquet")
    assert ds.captions == ["a cat", "a dog"] and ds.stats.no_caption == 1


def test_a_link_to_another_file_of_the_folder_is_read_once(tmp_path, caplog):
    write_pairs(tmp_path / "part-0.parquet", [row(caption=f"r{j}") for j in range(3)])
    (tmp_path / "latest.parquet").symlink_to(tmp_path / "part-0.parquet")
    ds = PairDataset(tmp_path)
    assert len(ds) == 3 and "are one file (a link): read once" in caplog.text


def test_folder_of_files_and_load_pairs(tmp_path):
    for i in range(2):
        write_pairs(tmp_path / f"part-{i}.parquet", [row(caption=f"f{i}r{j}") for j in range(2)])
    cfg = DataConfig(path=str(tmp_path), resolution=8, max_pairs=3)
    ds = load_pairs(cfg, seed=0)
    assert ds.captions == ["f0r0", "f0r1", "f1r0"]
    with pytest.raises(ValueError, match="data.path"):
        load_pairs(DataConfig(), seed=0)


def test_prompt_dropout_rate_and_reproducible(tmp_path):
    tiny = image_bytes(RED, size=(8, 8))
    path = write_pairs(tmp_path / "p.parquet", [row(caption=f"c{i}", jpg_0=tiny, jpg_1=tiny) for i in range(400)])
    ds = PairDataset(path, resolution=8, prompt_dropout=0.2, seed=1)
    captions = [ds[i]["caption"] for i in range(len(ds))]
    assert 0.15 < captions.count("") / len(captions) < 0.25
    assert captions == [PairDataset(path, resolution=8, prompt_dropout=0.2, seed=1)[i]["caption"]
                        for i in range(len(ds))]
    expected = ["" if item_draws(1, 0, i)[0] < 0.2 else f"c{i}" for i in range(400)]
    assert captions == expected


def test_empty_caption_allowed_and_toy_exporter_format(tmp_path):
    from t2i_align.toy.pairs import jpeg_bytes, write_parquet

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    rows = [{"caption": "", "jpg_0": jpeg_bytes(img), "jpg_1": jpeg_bytes(img), "label_0": 0.0, "label_1": 1.0,
             "user_id": 0, "are_different": True, "has_label": True, "model_0": "m", "model_1": "m",
             "ranking_id": 0}]
    write_parquet(rows, tmp_path / "pairs.parquet")
    ds = PairDataset(tmp_path / "pairs.parquet", resolution=8)
    assert len(ds) == 1 and ds[0]["caption"] == ""


def test_dataset_pickles_for_spawned_workers(tmp_path):
    import pickle

    ds = PairDataset(write_pairs(tmp_path / "p.parquet", [row(), row(jpg_0=image_bytes(GREEN))]), resolution=8)
    first = ds[1]  # opens the file and keeps a row group
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["pixels_w"], first["pixels_w"]) and clone._handles


def test_an_undecodable_pair_is_named_by_file_row_and_column(tmp_path, caplog):
    """It said "undecodable image, skipped: cannot identify image file <_io.BytesIO object at 0x...>": not which
    file or column, nor that a path stored where image bytes belong is the cause."""
    write_pairs(tmp_path / "a.parquet", [row(), row()])  # a second file: the row is named within its own file
    write_pairs(tmp_path / "mine.parquet", [row(), row(), row(label_0=0.0, jpg_0=b"GIF89 broken")], row_group_size=2)
    data = PairDataset(tmp_path, resolution=8)
    with caplog.at_level(logging.WARNING):
        assert data[4] is None and data[3] is not None
    (told,) = (r.getMessage() for r in caplog.records)
    assert told == ("mine.parquet, row group 1, row 0 of it (pair 4): jpg_0 does not decode, pair skipped: not an "
                    "image format PIL reads (it starts b'GIF89 br')")  # label 0: jpg_1 won and decoded first
    with pytest.raises(ValueError, match=r"holds text \('img/a.png'\), not image bytes: pair data keeps its images "
                                         r"in the parquet \(python -m t2i_align.data pairs imports image files\)"):
        decode_rgb("img/a.png")  # a column of file paths


def test_a_pair_flagged_as_one_image_twice_is_skipped_and_counted(tmp_path):
    """Pick-a-Pic's are_different=false rows (one image twice) were trained on: a pair that teaches nothing."""
    path = write_pairs(tmp_path / "p.parquet", [row(caption="a", are_different=True),
                                                row(caption="b", are_different=False),
                                                row(caption="c", are_different=None)])  # unknown: kept
    ds = PairDataset(path, resolution=8)
    assert ds.captions == ["a", "c"] and (ds.stats.same_image, ds.stats.used) == (1, 2)
    ints = write_pairs(tmp_path / "i.parquet", [row(caption="a", are_different=1), row(caption="b", are_different=0)])
    assert PairDataset(ints, resolution=8).captions == ["a"]  # a pandas round trip makes the flag a number


def test_the_run_says_what_its_data_held_and_skipped(tmp_path):
    from types import SimpleNamespace

    from t2i_align.data.sources import report_rows

    path = write_pairs(tmp_path / "p.parquet", [row(), row(label_0=0.5), row(label_0=float("nan")), row(caption=None),
                                                row(caption=" ")])
    said = []
    told = SimpleNamespace(print=lambda message, file=None: said.append((message, file)))
    report_rows(told, path, PairDataset(path, resolution=8).stats, cached=False)
    assert said == [(f"data {path}: rows=5, used=2, ties dropped=1, ties kept=0, unlabelled=0, invalid labels=1, "
                     "corrupt=0, no caption=1, empty caption=1, other models=0, same image=0; undecodable images are "
                     "skipped as training meets them (data_rows_skipped)", sys.stderr)]


@pytest.mark.parametrize("mode", ["fixed", "per_image"])
def test_sdxl_time_ids_of_pair_and_image_batches(mode):
    """data.time_ids: "fixed" conditions every image as the pipeline samples, [R, R, 0, 0, R, R], so both images of
    a pair see one condition (the official Diffusion-DPO code); "per_image" gives each image its size before the
    resize and its crop. R = 64 here (8 latent pixels x the VAE's 8)."""
    from types import SimpleNamespace

    from t2i_align.batches import to_image_batch, to_pair_batch

    comps = SimpleNamespace(spec=SimpleNamespace(uses_time_ids=True), time_ids=mode, vae_scale_factor=8, users=None)
    raw = {"latents_w": torch.zeros(2, 4, 8, 8), "latents_l": torch.zeros(2, 4, 8, 8),
           "prompt_embeds": torch.zeros(2, 3, 5), "pooled_prompt_embeds": torch.zeros(2, 5),
           "original_size_w": torch.tensor([[64, 96], [64, 64]]), "crop_top_left_w": torch.tensor([[0, 16], [0, 0]]),
           "original_size_l": torch.tensor([[96, 64], [64, 64]]), "crop_top_left_l": torch.tensor([[16, 0], [0, 0]])}
    pair = to_pair_batch(comps, raw, torch.device("cpu"))
    image = to_image_batch(comps, {"latents": raw["latents_w"], "prompt_embeds": raw["prompt_embeds"],
                                   "pooled_prompt_embeds": raw["pooled_prompt_embeds"],
                                   "original_size": raw["original_size_w"], "crop_top_left": raw["crop_top_left_w"]},
                           torch.device("cpu"))
    if mode == "fixed":
        want_w = want_l = [[64, 64, 0, 0, 64, 64]] * 2
    else:
        want_w = [[64, 96, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]
        want_l = [[96, 64, 16, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert pair.time_ids_w.tolist() == want_w and pair.time_ids_l.tolist() == want_l
    assert image.time_ids.tolist() == want_w


def test_uncached_data_must_hold_the_same_rows_on_every_process(tmp_path, monkeypatch):
    """A cache build checked that every process read the same rows; uncached data did not, so a machine with a
    partial copy shared out its own rows (some trained twice, some never)."""
    from types import SimpleNamespace

    import t2i_align.data.sources as sources
    from t2i_align.data.cache import DataMismatch, rows_digest
    from t2i_align.data.cache_build import Team

    from t2i_align.config import load_config

    path = write_pairs(tmp_path / "a.parquet", [row(caption=f"r{j}") for j in range(4)])
    partial = PairDataset(write_pairs(tmp_path / "b.parquet", [row(caption=f"r{j}") for j in range(3)]))
    cfg = load_config(None, [f"data.path={path}", "data.resolution=8", "train.batch_size=1"])
    first = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True, print=lambda *a, **k: None)
    for theirs, fails in ((partial, True), (PairDataset(path), False)):
        team = Team(0, 2, gather=lambda mine, theirs=theirs: [mine, rows_digest(theirs)])
        monkeypatch.setattr(sources, "_team", lambda accelerator, team=team: team)
        if fails:
            with pytest.raises(DataMismatch, match="process 1's data rows differ"):
                sources.build_data_source(cfg, None, first)
        else:
            assert sources.build_data_source(cfg, None, first) is not None


def test_the_streaming_reader_gives_caption_items_as_random_access_does(tmp_path):
    """Caption caches read whole row groups' images (a 460 MB group: 1.6 GB more); the cache build now reads them
    in small record batches, and must make the same items: bytes and image files, row groups of 3, a bad image."""
    from t2i_align.data.captions import CaptionDataset
    from t2i_align.data.stream import RowReader

    colours = [RED, BLUE, (0, 200, 0), (200, 200, 0), (0, 0, 0)]
    rows = [{"caption": f"c{i}", "jpg": image_bytes(c, size=(20 + i, 16))} for i, c in enumerate(colours)]
    rows[3]["jpg"] = b"not an image"
    write_pairs(tmp_path / "a.parquet", rows, row_group_size=3)
    Image.new("RGB", (16, 24), BLUE).save(tmp_path / "x.png")
    write_pairs(tmp_path / "b.parquet", [{"caption": "file", "path": "x.png"}])
    ds = CaptionDataset(tmp_path, resolution=8, crop="random", flip="independent", seed=3)
    streamed = {i: ds.item_from_raw(i, *raw) for i, *raw in RowReader(ds).rows(range(len(ds)))}
    assert sorted(streamed) == list(range(6)) and streamed[3] is None and ds[3] is None
    for i in (0, 1, 2, 4, 5):
        item = ds[i]
        assert torch.equal(streamed[i]["pixels"], item["pixels"]) and streamed[i]["crop_top_left"] == \
            item["crop_top_left"] and streamed[i]["caption"] == item["caption"]


def test_huge_images_are_refused_before_their_pixels_are_read_and_eps_is_not_opened(monkeypatch):
    """An image over MAX_IMAGE_PIXELS was read whole (PIL warns only up to twice that: 1.6 GB for a 1.3 MB PNG of
    12000 x 12000); an EPS file was handed to Ghostscript."""
    from t2i_align.data.images import decode_image

    Image.init()  # its plugins' imports load images
    small = image_bytes(128, size=(8, 8), mode="L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # PIL's own error starts at twice the limit
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self.size))
    with pytest.raises(ValueError, match="8x8 px: over 40 pixels .*MAX_IMAGE_PIXELS"):
        decode_image(small)
    assert loaded == []
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**8)
    monkeypatch.setattr("PIL.EpsImagePlugin.has_ghostscript", lambda: True)  # as where Ghostscript is installed
    with pytest.raises(ValueError, match="not an image format PIL reads"):
        decode_image(eps)


def test_pixel_reading_is_pinned_so_a_change_renews_every_cache():
    """Latent caches are keyed by PIXEL_READING, not by the decoding code: two changes to `decode_rgb` (float images
    in [0, 1], too-thin images) kept old caches. If this digest changes, raise PIXEL_READING and write both here."""
    import hashlib

    from t2i_align.data.images import PIXEL_READING

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), rng.integers(0, 256, (5, 6), dtype=np.uint8),
              rng.integers(0, 65536, (5, 6), dtype=np.uint16), rng.random((5, 6), dtype=np.float32),
              rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)]
    digest = hashlib.sha256()
    for arr in arrays:  # lossless TIFF: the same bytes under any Pillow
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        digest.update(np.asarray(decode_rgb(buf.getvalue())).tobytes())
    palette = io.BytesIO()
    Image.fromarray(arrays[0]).convert("P").save(palette, format="PNG", transparency=0)
    digest.update(np.asarray(decode_rgb(palette.getvalue())).tobytes())
    assert (PIXEL_READING, digest.hexdigest()[:16]) == (2, "f8dca85ca56568ed")
