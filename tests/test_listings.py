"""`python -m t2i_align.data pairs | captions`: a user's own image pairs or captioned images (JSONL or CSV listing)
as the parquet the loop reads, every unusable row skipped and counted by reason, paths kept inside the image root,
nothing earlier replaced."""
import csv
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from t2i_align.data.__main__ import main
from t2i_align.data.listings import PICKAPIC_COLUMNS
from t2i_align.data.pairs import PairDataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def folder(tmp_path):
    """images/{red,green,blue}.png, a corrupt images/bad.png and an image outside the folder."""
    data = tmp_path / "mine"
    (data / "images").mkdir(parents=True)
    for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        Image.new("RGB", (8, 8), colour).save(data / "images" / f"{name}.png")
    (data / "images" / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8), RED).save(tmp_path / "outside.png")
    return data


LISTING = [  # (row, why it is skipped or None)
    ({"caption": "red wins", "image_w": "images/red.png", "image_l": "images/blue.png"}, None),
    ({"prompt": "green wins", "image_0": "images/blue.png", "image_1": "images/green.png", "label_0": 0,
      "user_id": 7}, None),
    ({"caption": "a tie", "image_0": "images/red.png", "image_1": "images/green.png", "label_0": 0.5}, None),
    ({"image_w": "images/red.png", "image_l": "images/blue.png"}, "missing_field"),
    ({"caption": "x", "image_0": "images/red.png", "image_1": "images/blue.png", "label_0": 2}, "bad_label"),
    ({"caption": "x", "image_0": "images/red.png", "image_1": "images/blue.png", "label_0": "yes"}, "bad_label"),
    ({"caption": "x", "image_w": "images/none.png", "image_l": "images/blue.png"}, "missing_image"),
    ({"caption": "x", "image_w": "../outside.png", "image_l": "images/blue.png"}, "outside_root"),
    ({"caption": "x", "image_w": "images/bad.png", "image_l": "images/blue.png"}, "undecodable_image"),
    ({"caption": "x", "image_w": "images/red.png", "image_l": "images/blue.png", "user_id": 1.5}, "bad_user_id"),
    ({"caption": "x", "image_w": "images/red.png", "image_l": "images/red.png"}, "same_image"),
]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def run(capsys, *argv, kind="pairs"):
    code = main([kind, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_a_jsonl_listing_becomes_pairs_the_loop_reads(folder, capsys):
    listing = write_jsonl(folder / "pairs.jsonl", [r for r, _ in LISTING], ["\n", "[1, 2]\n", "{broken\n"])
    code, counts, err = run(capsys, "--from", listing, "--out", folder, "--row-group-size", 2)
    assert code == 0, err
    reasons = [why for _, why in LISTING if why] + ["not_json", "not_json"]
    assert counts["pairs"] == 3 and counts["ties"] == 1
    assert counts["skipped"] == {r: reasons.count(r) for r in sorted(set(reasons))}
    assert json.loads((folder / "pairs.json").read_text()) == counts
    assert "pairs.jsonl line 4 skipped: no caption or prompt" in err  # the first 5 are named, the rest counted
    assert "pairs.jsonl line 8 skipped" in err and "line 9 skipped" not in err
    assert "5 more rows skipped" in err
    table = pq.read_table(folder / "pairs.parquet")
    assert tuple(table.column_names) == PICKAPIC_COLUMNS
    assert pq.ParquetFile(folder / "pairs.parquet").num_row_groups == 2  # --row-group-size 2, 3 rows
    rows = table.to_pylist()
    assert [r["label_0"] for r in rows] == [1.0, 0.0, 0.5] and [r["user_id"] for r in rows] == [None, 7, None]
    assert rows[0]["jpg_0"] == (folder / "images" / "red.png").read_bytes()  # copied, not re-encoded
    assert [r["ranking_id"] for r in rows] == [1, 2, 3]  # the listing's line numbers
    pairs = PairDataset(folder / "pairs.parquet", resolution=8)  # ties dropped, label 0 swapped: winner first
    assert len(pairs) == 2 and pairs.stats.ties_dropped == 1
    for i, (caption, winner) in enumerate((("red wins", RED), ("green wins", GREEN))):
        item = pairs[i]
        colour = tuple(int(round(v)) for v in ((item["pixels_w"].mean(dim=(1, 2)) + 1) * 127.5).tolist())
        assert item["caption"] == caption and colour == winner


def test_a_csv_listing_and_an_image_root(folder, tmp_path, capsys):
    listing = tmp_path / "elsewhere" / "pairs.csv"
    listing.parent.mkdir()
    with open(listing, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "image_0", "image_1", "label_0", "user_id"])
        writer.writeheader()
        writer.writerow({"prompt": "blue wins", "image_0": "images/red.png", "image_1": "images/blue.png",
                         "label_0": "0", "user_id": "12"})
        writer.writerow({"prompt": "no label", "image_0": "images/red.png", "image_1": "images/blue.png"})
    code, counts, err = run(capsys, "--from", listing, "--out", tmp_path / "out", "--image-root", folder)
    assert code == 0, err
    assert counts["pairs"] == 1 and counts["skipped"] == {"missing_field": 1}
    assert "pairs.csv line 3 skipped: no label_0" in err
    (row,) = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert (row["caption"], row["label_0"], row["label_1"], row["user_id"]) == ("blue wins", 0.0, 1.0, 12)
    assert row["are_different"] is True and row["has_label"] is True


def test_a_line_that_is_not_utf8_and_captions_that_are_not_text_are_skipped(folder, capsys):
    """A non-UTF-8 byte stopped the whole import (at a buffer offset, not a line); a list or number caption was
    stored as its str() ("['a', 'b']"), which training would read as a prompt."""
    good = LISTING[0][0]
    lines = [json.dumps(good), json.dumps({**good, "caption": ["a", "b"]}), json.dumps({**good, "caption": 12})]
    listing = folder / "pairs.jsonl"
    listing.write_bytes(("\n".join(lines) + "\n").encode() + b'{"caption": "caf\xe9"}\n' + lines[0].encode() + b"\n")
    code, counts, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 0, err
    assert counts["pairs"] == 2 and counts["skipped"] == {"bad_caption": 2, "not_utf8": 1}
    assert "pairs.jsonl line 4 skipped: not UTF-8 text" in err
    assert [r["caption"] for r in pq.read_table(folder / "pairs.parquet").to_pylist()] == ["red wins", "red wins"]


def test_text_parquet_cannot_hold_json_python_cannot_read_and_too_thin_images_are_skipped(folder, capsys):
    """A lone surrogate in a caption or model name failed the parquet write (every image read so far lost); an
    integer of 5000 digits or deep nesting was a traceback; a 400x4 image passed the import, then its resize
    before the crop (MAX_ASPECT) would be MAX_ASPECT·R² pixels."""
    Image.new("RGB", (400, 4), RED).save(folder / "images" / "thin.png")
    good = LISTING[0][0]
    listing = write_jsonl(folder / "pairs.jsonl", [good, {**good, "caption": "bad \ud800"},
                                                   {**good, "model_0": "m\udfff"},
                                                   {**good, "image_w": "images/thin.png"}],
                          ['{"caption": "x", "user_id": ' + "9" * 5000 + "}\n", "[" * 100000 + "\n"])
    code, counts, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 0, err
    assert counts["pairs"] == 1
    assert counts["skipped"] == {"bad_text": 2, "not_json": 2, "undecodable_image": 1}
    assert "too thin to train on" in err


def test_an_image_whose_exif_does_not_parse_is_skipped_at_import_and_in_training(folder, capsys, monkeypatch):
    """A damaged EXIF block raises struct.error in exif_transpose, which Image.open().load() never reaches: the
    import took the image and training stopped with a traceback."""
    import struct

    from PIL import ImageOps

    def damaged(image, **kw):
        raise struct.error("required argument is not an integer")

    listing = write_jsonl(folder / "pairs.jsonl", [LISTING[0][0]])
    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    code, _, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 2 and "no usable row" in err and "undecodable_image" in err
    monkeypatch.undo()
    assert run(capsys, "--from", listing, "--out", folder)[0] == 0
    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    data = PairDataset(folder / "pairs.parquet", resolution=8)
    assert data[0] is None  # the pair is skipped, not a traceback


def test_a_quote_that_swallows_the_rest_of_a_csv_is_named(folder, capsys):
    """A record of more lines than the log names rows was counted (10) but never named."""
    listing = folder / "pairs.csv"
    listing.write_text("caption,image_w,image_l\nred wins,images/red.png,images/blue.png\n"
                       '"oops,images/red.png,images/blue.png\n' + "x,images/red.png,images/blue.png\n" * 9 + '"\n')
    code, counts, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 0 and counts["skipped"] == {"multiline_record": 11}
    assert "pairs.csv line 3 skipped: a quoted field runs over lines 3-13" in err
    # never closed, past csv's field limit (128 KiB): "cannot be read as CSV (UTF-8) ... after line 1" before
    listing.write_text("caption,image_w,image_l\nred wins,images/red.png,images/blue.png\n"
                       '"oops,images/red.png,images/blue.png\n' + "x,images/red.png,images/blue.png\n" * 5000)
    code, _, err = run(capsys, "--from", listing, "--out", folder, "--overwrite")
    assert code == 2 and "a quote opened in the record starting on line 3 is never closed" in err


def test_a_csv_quote_left_open_or_an_unquoted_comma_skips_its_rows_by_line(folder, capsys):
    """An open quote swallowed the rows after it into one caption, and a comma in an unquoted caption cut it,
    neither counted; the lines named were records, not lines."""
    listing = folder / "pairs.csv"
    listing.write_text("caption,image_w,image_l\n"
                       "red wins,images/red.png,images/blue.png\n"
                       "\n"
                       '"oops,images/red.png,images/blue.png\n'
                       "swallowed,images/red.png,images/blue.png\n"
                       'ends here",images/red.png,images/blue.png\n'
                       "a red cat, sitting,images/red.png,images/blue.png\n"
                       "green wins,images/green.png,images/blue.png\n")
    code, counts, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 0, err
    assert counts["pairs"] == 2 and counts["skipped"] == {"extra_fields": 1, "multiline_record": 3}  # 3 lines
    assert err.count("pairs.csv line 4 skipped: a quoted field runs over lines 4-6") == 1  # blank line 3 not counted
    assert "pairs.csv line 7 skipped: 1 more field(s) than the header names" in err
    assert [r["caption"] for r in pq.read_table(folder / "pairs.parquet").to_pylist()] == ["red wins", "green wins"]


@pytest.mark.parametrize("case, told", [
    ("no-listing", "--from {d}/nothing.jsonl: no such file"),
    ("not-jsonl-or-csv", "--from {d}/pairs.txt: expected a .jsonl or .csv listing"),
    ("no-usable-row", "no usable row in {d}/pairs.jsonl (skipped: {{'missing_image': 1}}); each row needs caption "
                      "or prompt, and image_w + image_l or image_0 + image_1 + label_0; its first row's fields: "
                      "caption, image_w, image_l"),
    ("semicolon-csv", "no usable row in {d}/pairs.csv (skipped: {{'missing_field': 1}}); each row needs caption or "
                      "prompt, and image_w + image_l or image_0 + image_1 + label_0; its first row's fields: "
                      "caption;image_w;image_l (a CSV is comma-separated)"),
    ("comma-csv-no-image", "no usable row in {d}/pairs.csv (skipped: {{'missing_image': 1}}); each row needs caption "
                           "or prompt, and image_w + image_l or image_0 + image_1 + label_0; its first row's fields: "
                           "caption, image_w, image_l"),
    ("from-a-folder", "--from {d} is a folder: give the .jsonl or .csv listing in it (one row per pair; its image "
                      "paths relative to --image-root)"),
    ("earlier-pairs", "{d}/pairs.parquet exists and --out {d} would replace it: choose another --out or pass "
                      "--overwrite"),
    ("image-root-missing", "--image-root {d}/nowhere: no such folder"),
    ("row-group-size-0", "--row-group-size must be >= 1, got 0"),
])
def test_mistakes_are_one_error_line_and_keep_earlier_pairs(folder, capsys, case, told):
    earlier = folder / "pairs.parquet"
    earlier.write_bytes(b"an earlier pair set")
    listing = write_jsonl(folder / "pairs.jsonl", [LISTING[0][0]])
    argv = ["--from", listing, "--out", folder, "--overwrite"]
    if case == "no-listing":
        argv[1] = folder / "nothing.jsonl"
    elif case == "not-jsonl-or-csv":
        argv[1] = folder / "pairs.txt"
        argv[1].write_text("a b c\n")
    elif case == "no-usable-row":
        write_jsonl(listing, [{"caption": "x", "image_w": "images/none.png", "image_l": "images/red.png"}])
    elif case == "semicolon-csv":
        argv[1] = folder / "pairs.csv"
        argv[1].write_text("caption;image_w;image_l\nx;images/red.png;images/blue.png\n")
    elif case == "comma-csv-no-image":
        argv[1] = folder / "pairs.csv"
        argv[1].write_text("caption,image_w,image_l\nx,images/none.png,images/blue.png\n")
    elif case == "from-a-folder":
        argv[1] = folder
    elif case == "earlier-pairs":
        argv = argv[:-1]
    elif case == "image-root-missing":
        argv += ["--image-root", folder / "nowhere"]
    elif case == "row-group-size-0":
        argv += ["--row-group-size", 0]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.splitlines()[-1] == "error: " + told.format(d=folder), err
    assert earlier.read_bytes() == b"an earlier pair set"
    extra = {"semicolon-csv": ["pairs.csv"], "comma-csv-no-image": ["pairs.csv"],
             "not-jsonl-or-csv": ["pairs.txt"]}.get(case, [])
    assert sorted(p.name for p in folder.iterdir()) == sorted(["images", "pairs.jsonl", "pairs.parquet", *extra])


def test_a_listing_given_as_training_data_is_pointed_to_the_import(folder):
    from t2i_align.config import ConfigError
    from t2i_align.data.images import find_parquet_files

    listing = write_jsonl(folder / "pairs.jsonl", [LISTING[0][0]])
    with pytest.raises(ConfigError, match=r"is a listing, not parquet: python -m t2i_align.data pairs --from LISTING"):
        find_parquet_files(listing)
    with pytest.raises(ConfigError, match=r"no \*.parquet files in folder .*mine \(images listed in a JSONL"):
        find_parquet_files(folder)


def test_a_caption_listing_becomes_image_caption_data(folder, capsys):
    """LongAlign's stage-1 data (data.kind=captions): a caption and one image per row."""
    from t2i_align.data.captions import CaptionDataset

    listing = write_jsonl(folder / "long.jsonl", [
        {"caption": "a red square. It is large.", "image": "images/red.png"},
        {"prompt": "a blue square", "image": "images/blue.png"},
        {"caption": "no image"},
        {"caption": "corrupt", "image": "images/bad.png"},
    ])
    code, counts, err = run(capsys, "--from", listing, "--out", folder / "long", kind="captions")
    assert code == 0, err
    assert counts["captions"] == 2 and counts["skipped"] == {"missing_field": 1, "undecodable_image": 1}
    assert "ties" not in counts and (folder / "long" / "captions.json").is_file()
    data = CaptionDataset(folder / "long" / "captions.parquet", resolution=8)
    assert data.captions == ["a red square. It is large.", "a blue square"]
    blue = data[1]["pixels"]
    assert blue[2].min() == 1.0 and blue[0].max() == -1.0


def test_excel_csv_big_ids_and_links_out_of_the_root(folder, tmp_path, capsys):
    """A byte-order mark (Excel's UTF-8 CSV) hid the header's first name, so every row lacked its caption; a user id
    past 2**53 lost digits through float, past 2**63 crashed the writer; a symlink inside the root that points out
    of it is outside."""
    (folder / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    listing = folder / "pairs.csv"
    rows = [("prompt", "image_w", "image_l", "user_id"), ("big id", "images/red.png", "images/blue.png", 2**53 + 1),
            ("too big", "images/red.png", "images/blue.png", 2**63), ("linked", "images/link.png", "images/blue.png",
                                                                       "")]
    listing.write_text("\ufeff" + "".join(",".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    code, counts, err = run(capsys, "--from", listing, "--out", tmp_path / "out")
    assert code == 0, err
    assert counts["pairs"] == 1 and counts["skipped"] == {"bad_user_id": 1, "outside_root": 1}
    (row,) = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert (row["caption"], row["user_id"]) == ("big id", 2**53 + 1)


def test_text_user_ids_are_kept_as_text_and_then_every_id_is_text(folder, tmp_path, capsys):
    """user_id "alice" was skipped as not an integer, though the parquet reader and the user table take text ids.
    Now text ids are kept; a listing with any makes the column text, 12 written "12" (one column, one type)."""
    good = LISTING[0][0]
    listing = write_jsonl(folder / "pairs.jsonl", [{**good, "user_id": "alice"}, {**good, "user_id": 12},
                                                   {**good, "user_id": "12.5"}, good])
    code, counts, err = run(capsys, "--from", listing, "--out", tmp_path / "out")
    assert code == 0, err
    assert counts["pairs"] == 3 and counts["skipped"] == {"bad_user_id": 1}  # "12.5": a number, not an id
    assert pq.read_schema(tmp_path / "out" / "pairs.parquet").field("user_id").type == "string"
    assert PairDataset(tmp_path / "out" / "pairs.parquet", resolution=8).user_ids == ["alice", "12", None]


def test_image_paths_that_all_leave_the_listings_folder_name_the_image_root_option(folder, tmp_path, capsys):
    """A listing in meta/ naming ../images/... (or absolute paths) skipped every row as outside_root, and the error
    then listed the fields a row needs, which were all there."""
    (folder / "meta").mkdir()
    rows = [{"caption": "x", "image_w": "../images/red.png", "image_l": "../images/blue.png"},
            {"caption": "y", "image_w": str(folder / "images/green.png"), "image_l": "../images/blue.png"}]
    code, _, err = run(capsys, "--from", write_jsonl(folder / "meta" / "pairs.jsonl", rows), "--out", tmp_path / "o")
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("error: no usable row in ")
    assert "the image paths of 2 of 2 rows leave" in last and "pass --image-root FOLDER" in last
    assert "each row needs" not in last and not (tmp_path / "o" / "pairs.parquet").exists()


def test_an_earlier_summary_is_kept_without_overwrite(folder, capsys):
    (folder / "pairs.json").write_text("my notes")
    code, _, err = run(capsys, "--from", write_jsonl(folder / "pairs.jsonl", [LISTING[0][0]]), "--out", folder)
    assert code == 2 and "pairs.json exists and --out" in err and (folder / "pairs.json").read_text() == "my notes"


def test_an_out_folder_holding_another_data_sets_parquet_is_refused_without_overwrite(folder, tmp_path, capsys):
    """`--out` a folder that held another data set's parquet wrote pairs.parquet beside it, and training read the
    two merged."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.parquet").write_bytes(b"another data set")
    listing = write_jsonl(folder / "pairs.jsonl", [LISTING[0][0]])
    code, _, err = run(capsys, "--from", listing, "--out", out)
    assert code == 2 and not (out / "pairs.parquet").exists()
    last = err.splitlines()[-1]
    assert "already holds 1 other parquet file(s) (theirs.parquet)" in last and "--overwrite" in last
    code, counts, err = run(capsys, "--from", listing, "--out", out, "--overwrite")
    assert code == 0 and counts["pairs"] == 1 and (out / "theirs.parquet").read_bytes() == b"another data set"


def test_a_csv_line_that_is_not_utf8_skips_its_row_only(folder, capsys):
    """A Latin-1 byte stopped the whole CSV import (images read so far lost) and named a wrong line (the decoder's
    8 KB chunk, not the record); now its row is skipped and counted, as in JSONL, and the rows around it read."""
    listing = folder / "pairs.csv"
    listing.write_bytes(b"caption,image_w,image_l\nred wins,images/red.png,images/blue.png\n"
                        b"caf\xe9,images/red.png,images/blue.png\ngreen wins,images/green.png,images/blue.png\n")
    code, counts, err = run(capsys, "--from", listing, "--out", folder)
    assert code == 0, err
    assert counts["pairs"] == 2 and counts["skipped"] == {"not_utf8": 1}
    assert "pairs.csv line 3 skipped: not UTF-8 text\n" in err
    assert [r["caption"] for r in pq.read_table(folder / "pairs.parquet").to_pylist()] == ["red wins", "green wins"]
    listing.write_bytes(b"capti\xf3n,image_w,image_l\nred wins,images/red.png,images/blue.png\n")
    code, _, err = run(capsys, "--from", listing, "--out", folder, "--overwrite")
    assert code == 2 and "cannot be read as CSV (UTF-8) text" in err and "header line is not UTF-8" in err


def test_a_failed_import_leaves_no_empty_out_folder(folder, capsys, tmp_path):
    """A listing with no usable row left the --out folder it had made, empty."""
    listing = write_jsonl(folder / "bad.jsonl", [{"caption": "x", "image_w": "images/none.png",
                                                  "image_l": "images/red.png"}])
    code, _, err = run(capsys, "--from", listing, "--out", tmp_path / "new" / "pairs")
    assert code == 2 and "no usable row" in err and not (tmp_path / "new" / "pairs").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left as it was
    code, _, _ = run(capsys, "--from", listing, "--out", tmp_path / "kept")
    assert code == 2 and (tmp_path / "kept").is_dir()
