"""python -m t2i_align.data relabel: pairs labelled by a reward (AI feedback), on toy renders judged by toy-judge."""
import json
import sys

import pyarrow.parquet as pq
import pytest

from t2i_align.config import DataConfig
from t2i_align.data.__main__ import main
from t2i_align.data.pairs import load_pairs
from t2i_align.data.relabel import verdict
from t2i_align.toy.pairs import jpeg_bytes, write_parquet
from t2i_align.toy.scenes import all_scenes, render, short_caption

SCENES = all_scenes()[::37][:4]


def _rows():
    """Rows 0-3: the caption's render against another scene's, the render on side 0 for even rows; the people got
    row 3 wrong. Row 4: a human tie. Row 5: jpg_1 does not decode. Row 6: a caption toy-judge cannot read. Row 7:
    unlabelled (has_label false)."""
    rows = []
    for i, scene in enumerate(SCENES):
        good, wrong = jpeg_bytes(render(scene)), jpeg_bytes(render(SCENES[(i + 1) % len(SCENES)]))
        first, second, label = (good, wrong, 1.0) if i % 2 == 0 else (wrong, good, 0.0)
        rows.append({"caption": short_caption(scene), "jpg_0": first, "jpg_1": second, "label_0": label,
                     "label_1": 1.0 - label, "user_id": 7, "are_different": True, "has_label": True,
                     "model_0": "a", "model_1": "b", "ranking_id": i})
    rows[3]["label_0"], rows[3]["label_1"] = 1.0, 0.0
    rows.append({**rows[0], "label_0": 0.5, "label_1": 0.5, "ranking_id": 4})
    rows.append({**rows[0], "jpg_1": b"not a jpeg", "ranking_id": 5})
    rows.append({**rows[0], "caption": "a photograph of a dog", "ranking_id": 6})
    rows.append({**rows[1], "has_label": False, "ranking_id": 7})
    return rows


@pytest.fixture
def pairs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_parquet(_rows(), folder / "part-0.parquet")
    return folder


def _relabel(capsys, *argv):
    code = main(["relabel", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_verdict_by_hand():
    assert (verdict(0.7, 0.2), verdict(-1.0, 3.0), verdict(0.25, 0.25)) == (1.0, 0.0, 0.5)


def test_the_judge_relabels_pairs_keeping_every_column(pairs, tmp_path, capsys):
    out = tmp_path / "ai"
    code, summary, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--batch-size", 3)
    assert code == 0
    assert (summary["rows"], summary["written"], summary["reward_ties"]) == (8, 4, 0)
    assert summary["skipped"] == {"human_tie": 1, "unlabelled": 1, "invalid_label": 0, "unreadable_image": 1,
                                  "not_scored": 1, "not_text": 0}
    assert summary["agreement_with_human"]["n"] == 4 and summary["agreement_with_human"]["rate"] == 0.75
    assert json.loads((out / "relabel.json").read_text()) == summary
    assert set(pq.read_schema(pairs / "part-0.parquet").names) < set(pq.read_schema(out / "part-0.parquet").names)
    table = pq.read_table(out / "part-0.parquet").to_pylist()
    assert [r["ranking_id"] for r in table] == [0, 1, 2, 3]
    assert [r["label_0"] for r in table] == [1.0, 0.0, 1.0, 0.0]  # the caption's render wins, row 3 included
    assert [r["human_label_0"] for r in table] == [1.0, 0.0, 1.0, 1.0]
    assert all(r["label_1"] == 1 - r["label_0"] and r["user_id"] == 7 and r["model_1"] == "b" for r in table)
    assert all((r["reward_0"] > r["reward_1"]) == (r["label_0"] == 1.0) for r in table)
    assert table[0]["jpg_0"] == _rows()[0]["jpg_0"]  # image bytes as they were
    # training reads it as any pair data; relabelling the output again keeps the people's labels
    assert len(load_pairs(DataConfig(path=str(out)), seed=0)) == 4
    code, again, _ = _relabel(capsys, "--pairs", out, "--reward", "toy-judge", "--out", tmp_path / "again")
    assert code == 0 and again["agreement_with_human"]["rate"] == 0.75
    assert [r["human_label_0"] for r in pq.read_table(tmp_path / "again" / "part-0.parquet").to_pylist()] == \
        [1.0, 0.0, 1.0, 1.0]


def test_pairs_people_did_not_decide_can_be_relabelled_too(pairs, tmp_path, capsys):
    code, summary, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", tmp_path / "ai",
                                "--all-pairs")
    assert code == 0 and summary["written"] == 6 and summary["skipped"]["human_tie"] == 0
    rows = {r["ranking_id"]: r for r in pq.read_table(tmp_path / "ai" / "part-0.parquet").to_pylist()}
    assert (rows[4]["human_label_0"], rows[4]["label_0"]) == (0.5, 1.0)  # the tie: the caption's render on side 0
    assert (rows[7]["human_label_0"], rows[7]["label_0"], rows[7]["has_label"]) == (None, 0.0, True)


def test_invalid_labels_are_counted_as_such_and_relabelling_nothing_fails(tmp_path, capsys):
    """An invalid human label (3.0) was counted as "unlabelled"; a run that relabelled no pair exited 0 beside
    row-less files a training run then could not use; then it exited 2 and left them, so a rerun asked for
    --overwrite, and said "not_scored 1" without why."""
    folder, out = tmp_path / "pairs", tmp_path / "ai"
    folder.mkdir()
    rows = _rows()
    write_parquet([{**rows[0], "label_0": 3.0}, rows[4], rows[6], rows[7]], folder / "part-0.parquet")
    code, _, err = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", out)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: no pair was relabelled: of 4 rows read, skipped human_tie 1, unlabelled 1, "
                                "invalid_label 1, not_scored 1; the first not scored: ")
    assert "toy-judge" in errors[0] and errors[0].endswith(f"(its files in {out} removed); --all-pairs would add "
                                                         "the 3 pairs people did not decide, if the reward scores "
                                                         "them")  # it said "add --all-pairs" as if that were why
    assert not out.exists()  # the row-less files are gone: a rerun needs no --overwrite
    # the caption toy-judge cannot read stays unscored
    code, summary, _ = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", out, "--all-pairs")
    assert code == 0 and summary["written"] == 3 and summary["skipped"]["not_scored"] == 1


def test_relabelling_only_unlabelled_pairs_points_at_all_pairs(tmp_path, capsys):
    """Unlabelled pairs (has_label false) failed with "skipped unlabelled 2" and no word of --all-pairs, the flag
    that relabels them; with it given, the error does not offer it again."""
    folder, out = tmp_path / "pairs", tmp_path / "ai"
    folder.mkdir()
    rows = _rows()
    write_parquet([rows[7], {**rows[0], "has_label": False}], folder / "part-0.parquet")
    code, _, err = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", out)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: no pair was relabelled: of 2 rows read, skipped unlabelled 2 (its files in {out} removed); add "
        "--all-pairs to relabel the pairs people did not decide (ties, unlabelled, invalid labels)")
    code, summary, _ = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", out, "--all-pairs")
    assert code == 0 and summary["written"] == 2
    write_parquet([{**rows[6], "has_label": False}], folder / "part-0.parquet")  # a caption toy-judge cannot read
    code, _, err = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", tmp_path / "b", "--all-pairs")
    assert code == 2 and "not_scored 1" in err and "--all-pairs" not in err


def test_a_has_label_column_of_0_1_ints_is_written_as_bool(tmp_path, capsys):
    """label_problem reads 0/1 has_label; writing True into the input's int64 column failed after the scoring."""
    folder = tmp_path / "ints"
    folder.mkdir()
    import pyarrow as pa

    rows = [{**r, "has_label": int(r["has_label"])} for r in _rows()]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")  # has_label inferred as int64
    code, summary, _ = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", tmp_path / "ai",
                                "--all-pairs")
    assert code == 0 and summary["written"] == 6
    assert {r["has_label"] for r in pq.read_table(tmp_path / "ai" / "part-0.parquet").to_pylist()} == {True}


def test_an_earlier_output_is_kept_unless_resumed_or_overwritten(pairs, tmp_path, capsys):
    """--resume keeps a finished file made the same way and counts it; one made with another reward (or from
    another source) is refused; a file without its record (the run stopped before writing it) is redone."""
    out = tmp_path / "ai"
    write_parquet(_rows()[:3], pairs / "part-1.parquet")
    code, first, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out)
    assert code == 0 and first["written"] == 7 and first["files"] == 2
    before = (out / "part-0.parquet").stat().st_mtime_ns
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    (out / "part-1.parquet.relabel.json").unlink()  # as if stopped between part-1's file and its record
    code, summary, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--resume")
    assert code == 0 and "1 of 2 files already relabelled" in err
    assert {k: v for k, v in summary.items() if k != "files_kept"} == {k: v for k, v in first.items()
                                                                      if k != "files_kept"}
    assert summary["files_kept"] == 1 and (out / "part-0.parquet").stat().st_mtime_ns == before
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-clip", "--out", out, "--resume")
    assert code == 2 and "made with other reward" in err and len(err.strip().splitlines()) == 1
    code, summary, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--overwrite")
    assert code == 0 and summary["written"] == 7 and (out / "part-0.parquet").stat().st_mtime_ns != before


def test_a_run_stopped_after_replacing_a_file_leaves_no_record_and_resume_redoes_it(pairs, tmp_path, capsys,
                                                                                    monkeypatch):
    """The old record used to stay beside the new file until the new record was written: a run killed between the
    two left it vouching for a file it did not describe."""
    import t2i_align.data.relabel as relabel_module

    class Killed(BaseException):
        pass

    def killed(path, data, **kwargs):
        if path.name.endswith(".parquet.relabel.json"):
            raise Killed
        return write(path, data, **kwargs)

    out, record = tmp_path / "ai", tmp_path / "ai" / "part-0.parquet.relabel.json"
    assert _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out)[0] == 0 and record.is_file()
    before = (out / "part-0.parquet").stat().st_mtime_ns
    write = relabel_module.write_json_atomic
    monkeypatch.setattr(relabel_module, "write_json_atomic", killed)
    with pytest.raises(Killed):
        main(["relabel", "--pairs", str(pairs), "--reward", "toy-judge", "--out", str(out), "--overwrite"])
    assert (out / "part-0.parquet").stat().st_mtime_ns != before and not record.exists()
    monkeypatch.setattr(relabel_module, "write_json_atomic", write)
    code, summary, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--resume")
    assert code == 0 and "already relabelled" not in err and (summary["files_kept"], summary["written"]) == (0, 4)
    assert json.loads(record.read_text())["counts"]["written"] == 4


def test_a_stopped_relabelling_points_at_resume(pairs, tmp_path, capsys, monkeypatch):
    """Ctrl-C said only "stopped (Ctrl-C)", and the same command again said "exists ... pass --overwrite", which
    redoes the finished files; --resume keeps them."""
    import t2i_align.data.relabel as relabel_module

    write_parquet(_rows()[:4], pairs / "part-1.parquet")
    real, calls = relabel_module.relabel_file, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(relabel_module, "relabel_file", stopped_at_the_second)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # run_cli quiets the interrupt's traceback
    out = tmp_path / "ai"
    with pytest.raises(KeyboardInterrupt):
        main(["relabel", "--pairs", str(pairs), "--reward", "toy-judge", "--out", str(out)])
    assert f"stopped (Ctrl-C). The same command with --resume keeps the files finished in {out}" in \
        capsys.readouterr().err
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out)
    assert code == 2 and err.strip() == (f"error: {out} holds a stopped relabelling (1 of 2 files finished): pass "
                                         "--resume to finish it (the finished files are kept), or --overwrite to "
                                         "start over")
    code, summary, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--resume")
    assert code == 0 and summary["files_kept"] == 1 and len(calls) == 3


@pytest.mark.parametrize("case, told", [
    ("out_is_input", "would delete it"), ("no_images", "lacks column(s) ['jpg_0', 'jpg_1']"),
    ("missing", "does not exist: give a Pick-a-Pic"), ("unknown_reward", "bad --reward"),
    ("batch", "--batch-size must be >= 1"), ("corrupt", "is not a readable parquet file"),
    ("stray", "holds other parquet files (old.parquet)")])
def test_mistakes_are_one_error_line_and_write_nothing(pairs, tmp_path, capsys, case, told):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pq.read_table(pairs / "part-0.parquet").drop(["jpg_0", "jpg_1"]), bad / "x.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "old.parquet").write_bytes(b"earlier data")
    given = {"out_is_input": [pairs, "toy-judge", pairs], "no_images": [bad, "toy-judge", tmp_path / "o"],
             "missing": [tmp_path / "nowhere", "toy-judge", tmp_path / "o"],
             "unknown_reward": [pairs, "nope", tmp_path / "o"], "batch": [pairs, "toy-judge", tmp_path / "o"],
             "corrupt": [tmp_path / "corrupt.parquet", "toy-judge", tmp_path / "o"],
             "stray": [pairs, "toy-judge", tmp_path / "stray"]}[case]
    extra = ["--batch-size", 0] if case == "batch" else []
    code, _, err = _relabel(capsys, "--pairs", given[0], "--reward", given[1], "--out", given[2], *extra)
    assert code == 2 and told in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in pairs.iterdir()) == ["part-0.parquet"]


def test_resume_keeps_a_file_of_the_name_relabelling_did_not_write(pairs, tmp_path, capsys):
    """--resume took any file without a record for a stopped run's and replaced it: the user's own a.parquet of 50
    rows became relabelled output. Now refused, and by --overwrite too (it replaced it)."""
    out = tmp_path / "ai"
    out.mkdir()
    write_parquet(_rows()[:2], out / "part-0.parquet")  # the user's file, not relabelling's (no reward_0)
    mine = (out / "part-0.parquet").read_bytes()
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--resume")
    assert code == 2 and "was not written by relabelling" in err and (out / "part-0.parquet").read_bytes() == mine
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", out, "--overwrite")
    assert code == 2 and "--overwrite replaces only relabelling's files" in err
    assert (out / "part-0.parquet").read_bytes() == mine


def test_a_linked_input_file_keeps_each_output_named_as_its_input(pairs, tmp_path, capsys):
    """part-1 a link to part-0 (read once): the names shifted, part-2's rows written as part-1, no part-2."""
    write_parquet(_rows()[:3], pairs / "part-2.parquet")
    (pairs / "part-1.parquet").symlink_to(pairs / "part-0.parquet")
    code, summary, _ = _relabel(capsys, "--pairs", pairs, "--reward", "toy-judge", "--out", tmp_path / "ai")
    assert code == 0 and summary["files"] == 2
    assert sorted(p.name for p in (tmp_path / "ai").glob("*.parquet")) == ["part-0.parquet", "part-2.parquet"]
    assert pq.read_table(tmp_path / "ai" / "part-2.parquet").num_rows == 3


def test_a_reward_scored_against_its_batch_is_refused(pairs, tmp_path, capsys):
    """decomposed-clip's direction=batch: labels changed with --batch-size and one-caption batches were dropped."""
    code, _, err = _relabel(capsys, "--pairs", pairs, "--reward", "decomposed-clip", "--option",
                            "decomposed-clip.checkpoint=toy", "--option", "decomposed-clip.direction=batch",
                            "--out", tmp_path / "ai")
    assert code == 2 and "would depend on the images beside it and on --batch-size" in err
    assert not (tmp_path / "ai").exists()


def test_text_that_is_not_utf8_is_a_skipped_row_in_relabelling_and_in_training(tmp_path, capsys):
    """A caption (or generator name) that is not UTF-8 stopped relabelling with a bare UnicodeDecodeError, and
    data.both_models_contain training at its start; training counts the caption as missing."""
    import pyarrow as pa

    from test_longalign_data import not_utf8_strings

    table = pa.Table.from_pylist(_rows()[:4])
    table = table.set_column(table.schema.get_field_index("caption"), "caption", not_utf8_strings(
        [c.encode() for c in table.column("caption").to_pylist()[:3]] + [b"caf\xe9"]))
    table = table.set_column(table.schema.get_field_index("model_0"), "model_0",
                             not_utf8_strings([b"a", b"a", b"\xff", b"a"]))
    table = table.set_column(table.schema.get_field_index("model_1"), "model_1", pa.array(["a"] * 4))
    folder = tmp_path / "bad"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    code, summary, _ = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", tmp_path / "ai")
    assert code == 0 and summary["rows"] == 4 and summary["skipped"]["not_text"] == 2 and summary["written"] == 2
    trained = load_pairs(DataConfig(path=str(folder), resolution=8, both_models_contain="a"), seed=0)
    assert (trained.stats.used, trained.stats.other_models, trained.stats.no_caption) == (2, 1, 1)


def test_a_binary_caption_column_is_scored_as_its_text(tmp_path, capsys):
    """Bytes captions were scored as str(b'...'), "b'a red circle'"; now as their UTF-8 text, and bytes that are
    not UTF-8 are skipped as not_text."""
    import pyarrow as pa

    table = pa.Table.from_pylist(_rows()[:4])
    captions = [c.encode() for c in table.column("caption").to_pylist()[:3]] + [b"caf\xe9"]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.binary()))
    folder = tmp_path / "bytes"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    code, summary, _ = _relabel(capsys, "--pairs", folder, "--reward", "toy-judge", "--out", tmp_path / "ai")
    assert code == 0 and summary["skipped"]["not_text"] == 1 and summary["skipped"]["not_scored"] == 0
    assert summary["written"] == 3
    assert [r["label_0"] for r in pq.read_table(tmp_path / "ai" / "part-0.parquet").to_pylist()] == [1.0, 0.0, 1.0]


def test_a_fractional_human_label_has_a_winner_and_a_null_caption_is_no_text(tmp_path, capsys):
    """label_0 = 0.7 trains as "jpg_0 preferred" but relabel skipped it as a human tie; a null caption (a pair
    training skips) was scored as "" and counted in the agreement."""
    rows = _rows()[:2]
    rows[0]["label_0"], rows[0]["label_1"] = 0.7, 0.3  # jpg_0, the caption's render, preferred
    rows[1]["label_0"], rows[1]["label_1"] = 0.8, 0.2  # jpg_0, the wrong render: the judge disagrees
    rows.append({**rows[0], "caption": None, "ranking_id": 9})
    (tmp_path / "pairs").mkdir()
    write_parquet(rows, tmp_path / "pairs" / "p.parquet")
    code, summary, _ = _relabel(capsys, "--pairs", tmp_path / "pairs", "--reward", "toy-judge", "--out",
                                tmp_path / "ai")
    assert code == 0 and summary["written"] == 2 and summary["skipped"]["human_tie"] == 0
    assert summary["skipped"]["not_text"] == 1
    assert summary["agreement_with_human"]["n"] == 2 and summary["agreement_with_human"]["rate"] == 0.5
