"""`t2i-score` (reward_models/cli.py) on rendered toy images: folders, parquet pairs, errors, console script."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from reward_models.cli import main, parse_options, parse_value
from t2i_align.toy.pairs import jpeg_bytes, write_parquet
from t2i_align.toy.scenes import all_scenes, render, short_caption

SCENES = all_scenes()[::37][:5]


def _folder(tmp_path: Path) -> Path:
    """Five ground-truth renders (img_0..4.png), one corrupt file (img_9.png), prompts.txt one line each."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(SCENES):
        Image.fromarray(render(scene)).save(folder / f"img_{i}.png")
    (folder / "img_9.png").write_bytes(b"not a png at all")
    prompts = [short_caption(s) for s in SCENES] + [short_caption(SCENES[0])]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_folder_scores_every_image_and_flags_the_unreadable_one(tmp_path, capsys):
    folder = _folder(tmp_path)
    out = tmp_path / "scores.jsonl"
    code, summary, _ = _run(capsys, "--reward", "toy-clip,toy-judge", "--images", folder, "--prompts",
                            tmp_path / "prompts.txt", "--out", out, "--batch-size", 4)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"img_{i}.png" for i in range(5)] + ["img_9.png"]
    good, bad = rows[:5], rows[5]
    assert all(r["toy-judge"] == 1.0 and isinstance(r["toy-clip"], float) and "error" not in r for r in good)
    assert [r["prompt"] for r in good] == [short_caption(s) for s in SCENES]
    assert bad["toy-judge"] is None and bad["toy-clip"] is None and "unreadable image" in bad["error"]
    from reward_models import get_reward

    # the values are the reward's own on the same images (scored here in one batch, there in batches of 4)
    direct, _ = get_reward("toy-clip")([Image.fromarray(render(s)) for s in SCENES], [r["prompt"] for r in good])
    assert [r["toy-clip"] for r in good] == pytest.approx(direct.tolist(), abs=1e-4)
    assert summary["images"] == 6 and summary["errors"] == 1
    assert summary["rewards"]["toy-judge"] == {"mean": 1.0, "std": 0.0, "n": 5}
    assert summary["rewards"]["toy-clip"]["n"] == 5 and summary["rewards"]["toy-clip"]["truncated"] == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_tf32_on_cpu_says_it_does_nothing_and_scores_as_without(tmp_path, capsys):
    folder = _folder(tmp_path)
    args = ["--reward", "toy-clip", "--images", folder, "--prompts", tmp_path / "prompts.txt", "--device", "cpu"]
    code, plain, _ = _run(capsys, *args, "--out", tmp_path / "a.jsonl")
    code_tf32, with_flag, err = _run(capsys, *args, "--out", tmp_path / "b.jsonl", "--tf32")
    assert code == code_tf32 == 0
    assert "--tf32 acts on CUDA only; scoring on cpu in full fp32" in err
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_on_cuda_sets_tf32_matmuls(monkeypatch):
    import reward_models.base as base
    from reward_models.cli import use_tf32

    monkeypatch.setattr(base, "resolve_device", lambda device: torch.device("cuda"))
    before = torch.get_float32_matmul_precision()
    try:
        assert use_tf32(None)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_too_thin_image_is_a_row_error_not_a_huge_resize(tmp_path, capsys):
    """A 1 x 100000 PNG (375 bytes) made the short-side resize ask for a 224 x 22,400,000 image (60 GB): the run
    died. Now its row says why, as an undecodable image's does."""
    folder = _folder(tmp_path)
    Image.new("RGB", (1, 40)).save(folder / "img_8.png")  # 40:1, past MAX_ASPECT (32)
    (tmp_path / "prompts.txt").write_text("a red circle\n" * 7)
    code, summary, _ = _run(capsys, "--reward", "toy-clip", "--images", folder, "--prompts", tmp_path / "prompts.txt",
                            "--out", tmp_path / "s.jsonl")
    rows = {r["file"]: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert code == 0 and summary["errors"] == 2 and rows["img_8.png"]["toy-clip"] is None
    assert "1x40 px: sides more than 32:1 apart, too thin to score" in rows["img_8.png"]["error"]


def test_metadata_jsonl_csv_output_and_rejected_prompts(tmp_path, capsys):
    folder = _folder(tmp_path)
    meta = [{"file": f"img_{i}.png", "prompt": short_caption(s)} for i, s in enumerate(SCENES[:3])]
    meta.append({"file": "img_3.png", "prompt": "a photo of a cat"})  # not a toy caption: toy-judge rejects it
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "sub" / "scores.csv"
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", folder, "--out", out)
    assert code == 0 and summary["rewards"]["toy-judge"]["n"] == 3
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "prompt", "toy-judge", "error"]
    assert [r["toy-judge"] for r in rows] == ["1.0", "1.0", "1.0", ""]
    assert rows[3]["error"].startswith("toy-judge: not a toy short caption")

    # a row whose path leads out of the folder is that row's error (the whole run failed), the file not read
    meta[3] = {"file": "../prompts.txt", "prompt": short_caption(SCENES[0])}
    meta.append({"file": "a\u0000.png", "prompt": short_caption(SCENES[0])})  # not a valid file name
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", folder, "--out", out, "--overwrite")
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert code == 0 and summary["errors"] == 2 and summary["rewards"]["toy-judge"]["n"] == 3
    assert all(r["toy-judge"] == "" and "resolves outside the image folder" in r["error"] for r in rows[3:])


def test_a_reward_that_scores_no_image_fails_after_writing_the_rows(tmp_path, capsys):
    """toy-judge on captions it cannot read: every row flagged; it exited 0 with n = 0, as if it had worked."""
    folder = _folder(tmp_path)
    meta = [{"file": f"img_{i}.png", "prompt": "a photo of a cat"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "scores.jsonl"
    code = main(["--reward", "toy-clip,toy-judge", "--images", str(folder), "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 1 and json.loads(printed)["rewards"]["toy-judge"]["n"] == 0
    assert err.startswith("error: toy-judge scored none of the 3 images (first problem: toy-judge: not a toy")
    assert len(out.read_text().splitlines()) == 3


def _pair_rows():
    """Winner = the caption's render, loser = another scene; the winner's side alternates; one tie row."""
    rows = []
    for i, scene in enumerate(SCENES):
        good, wrong = render(scene), render(SCENES[(i + 1) % len(SCENES)])
        first, second, label = (good, wrong, 1.0) if i % 2 == 0 else (wrong, good, 0.0)
        rows.append({"caption": short_caption(scene), "jpg_0": jpeg_bytes(first), "jpg_1": jpeg_bytes(second),
                     "label_0": label, "label_1": 1.0 - label, "user_id": 0, "are_different": True,
                     "has_label": True, "model_0": "toy", "model_1": "toy", "ranking_id": i})
    rows.append({**rows[0], "label_0": 0.5, "label_1": 0.5, "ranking_id": len(rows)})
    return rows


def test_pairwise_accuracy_on_a_pickapic_parquet(tmp_path, capsys):
    path = tmp_path / "pairs.parquet"
    write_parquet(_pair_rows(), path)
    out = tmp_path / "scores.jsonl"
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", path, "--out", out, "--pairwise")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and [(r["row"], r["side"]) for r in rows[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert rows[0]["prompt"] == short_caption(SCENES[0]) and rows[0]["parquet"] == "pairs.parquet"
    pairwise = summary["pairwise"]
    assert pairwise["pairs"] == 6 and pairwise["label_ties_excluded"] == 1
    acc = pairwise["toy-judge"]
    assert acc["accuracy"] == 1.0 and acc["n"] == 5 and acc["reward_ties"] == 0
    # Wilson at p = 1, n = 5: low = 1 / (1 + z²/5) = 1 / 1.76829 = 0.56552
    assert acc["low"] == pytest.approx(0.56552, abs=1e-4) and acc["high"] == 1.0
    # a pair whose two images are the same bytes, labelled 1: a reward tie, counted as half a correct pair
    same = {**_pair_rows()[0], "jpg_1": _pair_rows()[0]["jpg_0"], "ranking_id": 99}
    write_parquet([*_pair_rows(), same], path)
    _, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", path, "--out", out, "--pairwise", "--overwrite")
    acc = summary["pairwise"]["toy-judge"]
    assert (acc["n"], acc["reward_ties"]) == (6, 1) and acc["accuracy"] == pytest.approx(5.5 / 6)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    folder = _folder(tmp_path)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"]}), bad)
    out = tmp_path / "s.jsonl"
    code, _, err = _run(capsys, "--reward", "toy-judge", "--images", bad, "--out", out)
    assert code == 2 and "['jpg_1']" in err and "found ['caption', 'jpg_0']" in err
    code, _, err = _run(capsys, "--reward", "no-such-reward", "--images", folder, "--prompts",
                        tmp_path / "prompts.txt", "--out", out)
    assert code == 2 and err.startswith("error: bad --reward") and "toy-judge" in err
    code, _, err = _run(capsys, "--reward", "toy-clip", "--option", "toy-clip:scale=2", "--images", folder,
                        "--out", out)
    assert code == 2 and "NAME.KEY=VALUE" in err
    (tmp_path / "short.txt").write_text("one prompt\n")
    code, _, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", tmp_path / "short.txt",
                        "--out", out)
    assert code == 2 and "1 prompt lines" in err and "6 image files" in err and "metadata.jsonl" not in err
    (folder / "metadata.jsonl").write_text(json.dumps({"file": "img_0.png", "prompt": "a"}) + "\n")  # generate.py's
    code, _, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", tmp_path / "short.txt",
                        "--out", out)
    assert code == 2 and "metadata.jsonl names each image's prompt (sample/generate.py writes it): drop " \
        "--prompts" in err
    assert not out.exists()


def test_missing_weights_name_the_file_and_its_source(tmp_path, capsys):
    folder = _folder(tmp_path)
    code, _, err = _run(capsys, "--reward", "hpsv2", "--option", "hpsv2.checkpoint=/nonexistent.pt", "--images",
                        folder, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "s.jsonl")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "/nonexistent.pt" in err and "HPS_v2.1_compressed.pt" in err and "huggingface.co/xswu/HPSv2" in err


def test_missing_weights_of_a_later_reward_are_found_before_any_reward_loads(tmp_path, capsys, monkeypatch):
    """`--reward toy-clip,hpsv2` with HPSv2's file missing loaded the first reward (CLIP-H: minutes) before
    failing on the second: the weight paths are checked with the options now."""
    import reward_models.base as base

    folder = _folder(tmp_path)
    built = []
    base._load_builtin()  # registered now, not over the stand-in later
    real = dict(base._REGISTRY)
    monkeypatch.setitem(base._REGISTRY, "toy-clip", lambda **kw: built.append("toy-clip") or real["toy-clip"](**kw))
    code, _, err = _run(capsys, "--reward", "toy-clip,hpsv2", "--option", "hpsv2.checkpoint=/nonexistent.pt",
                        "--images", folder, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "s.jsonl")
    assert code == 2 and "/nonexistent.pt" in err and "--option hpsv2.KEY=VALUE" in err
    assert built == []


def test_option_values_are_typed():
    assert [parse_value(v) for v in ("3", "0.5", "true", "None", "ViT-B-32")] == [3, 0.5, True, None, "ViT-B-32"]
    assert parse_options(["clip.arch=ViT-B-32", "clip.scale=2.5"], ["clip"]) == {"clip": {"arch": "ViT-B-32",
                                                                                         "scale": 2.5}}
    # text and path options stay text: a checkpoint named 2024 was the int 2024 (a TypeError), version 2.1 a float
    parsed = parse_options(["clip.checkpoint=2024", "hpsv2.version=2.1", "imagereward.checkpoint=7",
                            "clip.batch_size=8", "hpsv2.checkpoint=none"], ["clip", "hpsv2", "imagereward"])
    assert parsed == {"clip": {"checkpoint": "2024", "batch_size": 8}, "hpsv2": {"version": "2.1", "checkpoint": None},
                      "imagereward": {"checkpoint": "7"}}
    home = parse_options(["clip.checkpoint=~/w.pt"], ["clip"])["clip"]["checkpoint"]  # the shell leaves it
    assert home == str(Path.home() / "w.pt")


def test_installed_console_script(tmp_path):
    script = Path(sys.executable).parent / "t2i-score"
    if not script.exists():
        pytest.skip("t2i-score is not installed: pip install -e .")
    folder = _folder(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(script), "--reward", "toy-judge", "--images", str(folder), "--prompts",
                             str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "s.jsonl")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rewards"]["toy-judge"]["mean"] == 1.0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 6


def test_pairwise_excludes_and_counts_invalid_labels(tmp_path, capsys):
    rows = _pair_rows()
    rows += [{**rows[0], "label_0": 3.0, "ranking_id": 90}, {**rows[0], "label_0": float("nan"), "ranking_id": 91},
             {**rows[0], "has_label": False, "ranking_id": 92}]
    path = tmp_path / "pairs.parquet"
    write_parquet(rows, path)
    out = tmp_path / "scores.jsonl"
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", path, "--out", out, "--pairwise")
    assert code == 0
    pairwise = summary["pairwise"]
    assert pairwise["pairs"] == 9 and pairwise["label_ties_excluded"] == 1
    assert pairwise["invalid_labels_excluded"] == 2 and pairwise["unlabelled_excluded"] == 1
    assert pairwise["toy-judge"]["n"] == 5  # 3.0 is not counted as "image 0 wins"
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label_problem"] for r in scored[-6::2]] == ["invalid_labels", "invalid_labels", "unlabelled"]


def test_pairwise_with_no_usable_label_is_an_error_not_accuracy_null(tmp_path, capsys):
    """label_0 as text ("1", "tie", "left"): every pair was excluded as invalid, yet the run scored every image and
    exited 0 with accuracy null. Now an error before any reward loads; beside a usable file, excluded and counted."""
    rows = [{**r, "label_0": text, "label_1": text} for r, text in zip(_pair_rows(), ["1", "0", "tie", "left"])]
    folder = tmp_path / "pairs"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "a_text.parquet")
    out = tmp_path / "scores.jsonl"
    code, _, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--out", out, "--pairwise")
    assert code == 2 and err.startswith("error: --pairwise: no pair of --images") and len(err.splitlines()) == 1
    assert "(4 invalid labels; first: '1' in a_text.parquet row 0; label_0 must be a number in [0, 1]" in err
    assert not out.exists()
    write_parquet(_pair_rows(), folder / "b_numbers.parquet")
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", folder, "--out", out, "--pairwise")
    assert code == 0 and summary["pairwise"]["invalid_labels_excluded"] == 4
    assert summary["pairwise"]["toy-judge"]["n"] == 5


def test_parquet_captions_that_are_not_strings_are_scored_as_text(tmp_path, capsys):
    """A caption column of numbers (or a null caption) is read as text, as metadata.jsonl prompts are."""
    image = jpeg_bytes(render(SCENES[0]))
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"caption": pa.array([7, None], pa.int64()), "jpg_0": [image, image],
                             "jpg_1": [image, image]}), path)
    out = tmp_path / "scores.jsonl"
    code, summary, err = _run(capsys, "--reward", "toy-clip", "--images", path, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["7", "7", "", ""] and all(r["toy-clip"] is not None for r in rows)


@pytest.mark.parametrize("case, told", [
    ("option-for-another-reward", "--option 'clip.arch=ViT-B-32' is for reward 'clip', which is not in --reward"),
    ("prompts-with-a-trailing-blank-line", "has 7 prompt lines, 1 of them blank (each an empty prompt here)"),
    ("prompts-a-parquet", "is a parquet file: score Pick-a-Pic pairs with --images"),
    ("prompts-is-a-folder", "is a folder: give a .jsonl, .csv or text file of prompts"),
    ("prompts-missing", "no prompts:"),
    ("images-missing", "nowhere does not exist"),
    ("pairwise-on-a-folder", "--pairwise is for Pick-a-Pic parquets"),
    ("prompts-with-a-parquet", "--prompts for image folders (a parquet has captions)"),
    ("out-not-jsonl-or-csv", "scores.txt: give a .jsonl or .csv file name"),
    ("batch-size-0", "--batch-size 0: give a number >= 1"),
    ("out-exists", "scores.jsonl exists and --out"),
    ("parquet-that-is-not-one", "fake.parquet: Parquet magic bytes not found"),
])
def test_every_input_mistake_is_one_error_line(tmp_path, capsys, case, told):
    """Each mistake exits 2 with one `error:` line naming it, before any reward is loaded or output written."""
    folder = _folder(tmp_path)
    (folder / "img_9.png").unlink()
    parquet = tmp_path / "pairs.parquet"
    write_parquet(_pair_rows(), parquet)
    out = tmp_path / "scores.jsonl"
    argv = {"images": folder, "prompts": tmp_path / "prompts.txt", "out": out, "extra": []}
    if case == "option-for-another-reward":
        argv["extra"] = ["--option", "clip.arch=ViT-B-32"]
    elif case == "prompts-with-a-trailing-blank-line":
        (tmp_path / "prompts.txt").write_text((tmp_path / "prompts.txt").read_text() + "\n")
    elif case == "prompts-a-parquet":
        argv["prompts"] = parquet
    elif case == "prompts-is-a-folder":
        argv["prompts"] = folder
    elif case == "prompts-missing":
        argv["prompts"] = None  # and no FOLDER/metadata.jsonl
    elif case == "images-missing":
        argv["images"] = tmp_path / "nowhere"
    elif case == "pairwise-on-a-folder":
        argv["extra"] = ["--pairwise"]
    elif case == "prompts-with-a-parquet":
        argv["images"] = parquet
    elif case == "out-not-jsonl-or-csv":
        argv["out"] = tmp_path / "scores.txt"
    elif case == "batch-size-0":
        argv["extra"] = ["--batch-size", "0"]
    elif case == "out-exists":
        argv["out"] = tmp_path / "earlier" / "scores.jsonl"
        argv["out"].parent.mkdir()
        argv["out"].write_text("earlier scores\n")
    elif case == "parquet-that-is-not-one":
        argv["images"], argv["prompts"] = tmp_path / "fake.parquet", None
        argv["images"].write_bytes(b"not parquet")
    command = ["--reward", "toy-judge", "--images", argv["images"], "--out", argv["out"], *argv["extra"]]
    code, _, err = _run(capsys, *command, *(["--prompts", argv["prompts"]] if argv["prompts"] else []))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and told in lines[0], err
    assert not argv["out"].exists() or argv["out"].read_text() == "earlier scores\n"


def test_nothing_to_score_is_a_usage_error_not_an_empty_file(tmp_path, capsys):
    """An empty metadata.jsonl, a header-only CSV, an empty prompts file on an empty folder or a parquet without
    rows wrote an empty --out and exited 0."""
    folder, empty = tmp_path / "images", tmp_path / "empty"
    folder.mkdir()
    empty.mkdir()
    (folder / "metadata.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("file,prompt\n")
    (tmp_path / "none.txt").write_text("")
    columns = {"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
               "jpg_1": pa.array([], pa.binary())}
    pq.write_table(pa.table(columns), tmp_path / "rows.parquet")
    out = tmp_path / "scores.jsonl"
    for images, prompts, told in (
            (folder, [], f"no images to score in {folder}: {folder / 'metadata.jsonl'} lists none; give one row"),
            (folder, ["--prompts", tmp_path / "header.csv"], f"{tmp_path / 'header.csv'} lists none"),
            (empty, ["--prompts", tmp_path / "none.txt"], f"no images to score in {empty}: {tmp_path / 'none.txt'}"),
            (tmp_path / "rows.parquet", [], "rows.parquet: its parquet files hold no rows; give Pick-a-Pic files")):
        code, _, err = _run(capsys, "--reward", "toy-clip", "--images", images, *prompts, "--out", out)
        assert code == 2 and err.count("\n") == 1 and told in err, err
    assert not out.exists()


def test_scores_are_written_through_a_fresh_temp_file_removed_on_failure(tmp_path):
    """The fixed temp name `.scores.jsonl.tmp` was shared by two runs writing the same --out and left behind when
    the write failed."""
    from reward_models.cli import write_rows

    out = tmp_path / "scores.jsonl"
    (tmp_path / ".scores.jsonl.tmp").write_text("another run's half-written rows")
    write_rows([{"file": "a.png", "clip": 0.5}], out)
    assert json.loads(out.read_text()) == {"file": "a.png", "clip": 0.5}
    assert (tmp_path / ".scores.jsonl.tmp").read_text() == "another run's half-written rows"  # not touched
    with pytest.raises(TypeError):
        write_rows([{"file": "b.png", "clip": 0.1}, {"file": "c.png", "clip": object()}], out)  # fails half way
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scores.jsonl.tmp", "scores.jsonl"]
    assert json.loads(out.read_text())["file"] == "a.png"


def _failing_reward(fail):
    """A reward scoring each image 1.0 that calls `fail(call number, prompts)` first."""
    import torch

    calls = []

    def reward(images, prompts):
        calls.append(prompts)
        fail(len(calls), prompts)
        return torch.ones(len(images)), {}
    return reward


def test_an_image_a_model_cannot_take_is_flagged_and_the_others_scored(tmp_path, capsys, monkeypatch):
    """A RuntimeError from one image (a 1000 x 2 banner the resize makes 0 px high) lost the whole run."""
    folder, odd = _folder(tmp_path), short_caption(SCENES[1])

    def fail(call, prompts):
        if odd in prompts:
            raise RuntimeError("Input and output sizes should be greater than 0")
    monkeypatch.setattr("reward_models.cli.load_rewards", lambda *a: {"fake": _failing_reward(fail)})
    out = tmp_path / "scores.jsonl"
    code, summary, _ = _run(capsys, "--reward", "fake", "--images", folder, "--prompts", tmp_path / "prompts.txt",
                            "--out", out, "--batch-size", 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [r["fake"] for r in rows] == [1.0, None, 1.0, 1.0, 1.0, None]
    assert "fake: Input and output sizes" in rows[1]["error"] and summary["rewards"]["fake"]["n"] == 4


@pytest.mark.parametrize("stop", ["out of memory", "ctrl-c"])
def test_a_run_stopped_midway_keeps_the_scores_of_its_finished_batches(tmp_path, capsys, monkeypatch, stop):
    """Rows were written only at the end: out of memory or Ctrl-C in the last batch kept nothing."""
    import torch

    error = torch.OutOfMemoryError("CUDA out of memory") if stop == "out of memory" else KeyboardInterrupt()

    def fail(call, prompts):
        if call == 3:
            raise error
    monkeypatch.setattr("reward_models.cli.load_rewards", lambda *a: {"fake": _failing_reward(fail)})
    folder, out = _folder(tmp_path), tmp_path / "scores.jsonl"
    (tmp_path / "scores.partial.jsonl").write_text("an earlier run's\n")
    argv = ["--reward", "fake", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
            "--batch-size", "2"]
    if stop == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    else:  # README's remedy in one line (a traceback before)
        assert main(argv) == 2
    assert not out.exists() and (tmp_path / "scores.partial.jsonl").read_text() == "an earlier run's\n"
    kept = [json.loads(line) for line in (tmp_path / "scores.partial-2.jsonl").read_text().splitlines()]
    assert [r["file"] for r in kept] == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    err = capsys.readouterr().err
    assert "their scores are in" in err
    assert ("error: out of memory scoring 2 images at a time (CUDA out of memory): lower --batch-size" in err) == \
        (stop == "out of memory")


def test_an_out_folder_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("reward_models.cli.load_rewards", lambda *a: pytest.fail("loaded the rewards"))
    folder, locked = _folder(tmp_path), tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("tempfile.mkstemp", lambda dir, prefix: (_ for _ in ()).throw(PermissionError(13, "denied")))
    code = main(["--reward", "fake", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(locked / "sub" / "scores.jsonl")])
    assert code == 2 and f"cannot write in {locked} (denied)" in capsys.readouterr().err


def test_a_final_write_that_fails_keeps_the_scores_in_the_working_folder(tmp_path, capsys, monkeypatch):
    """The last write sat outside the kept-rows guard: a failure there threw every score away."""
    import reward_models.cli as cli

    monkeypatch.setattr(cli, "load_rewards", lambda *a: {"fake": _failing_reward(lambda call, prompts: None)})
    real_write = cli.write_rows
    beside = tmp_path / "out"

    def write(rows, path):
        if path.parent == beside:
            raise OSError(28, "No space left on device")
        real_write(rows, path)
    monkeypatch.setattr(cli, "write_rows", write)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = _folder(tmp_path)
    assert main(["--reward", "fake", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(beside / "scores.jsonl")]) == 2  # a full disk: one error line
    kept = [json.loads(line) for line in (work / "scores.partial.jsonl").read_text().splitlines()]
    err = capsys.readouterr().err
    assert len(kept) == 6 and f"their scores are in {work / 'scores.partial.jsonl'}" in err
    assert "No space left on device: free space or write elsewhere" in err


@pytest.mark.parametrize("batch", ["4", "1"])
def test_a_runtime_error_every_image_meets_alone_is_raised_not_flagged_on_every_row(tmp_path, monkeypatch, batch):
    """The model's error (a device-side assert), not an image's: flagging it on every row hid it as a slow run
    that scored nothing; with --batch-size 1 (no batch to compare within) it stops after LONE_FAILURES in a row."""
    def fail(call, prompts):
        raise RuntimeError("CUDA error: device-side assert triggered")
    monkeypatch.setattr("reward_models.cli.load_rewards", lambda *a: {"fake": _failing_reward(fail)})
    monkeypatch.setattr("reward_models.cli.LONE_FAILURES", 3)  # 5 readable images here
    folder = _folder(tmp_path)
    with pytest.raises(RuntimeError, match="device-side assert"):
        main(["--reward", "fake", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
              "--out", str(tmp_path / "scores.jsonl"), "--batch-size", batch])


def test_lone_image_errors_between_scored_images_are_flagged(tmp_path, capsys, monkeypatch):
    """With --batch-size 1, images that fail apart from each other are flagged; the run goes on."""
    odd = {short_caption(SCENES[1]), short_caption(SCENES[3])}

    def fail(call, prompts):
        if odd & set(prompts):
            raise RuntimeError("Input and output sizes should be greater than 0")
    monkeypatch.setattr("reward_models.cli.load_rewards", lambda *a: {"fake": _failing_reward(fail)})
    monkeypatch.setattr("reward_models.cli.LONE_FAILURES", 2)
    folder, out = _folder(tmp_path), tmp_path / "scores.jsonl"
    code, _, _ = _run(capsys, "--reward", "fake", "--images", folder, "--prompts", tmp_path / "prompts.txt",
                      "--out", out, "--batch-size", 1)
    assert code == 0 and [json.loads(line)["fake"] for line in out.read_text().splitlines()] == \
        [1.0, None, 1.0, None, 1.0, None]


def test_an_image_with_transparency_scores_as_through_the_library(tmp_path, capsys):
    """The CLI composited transparency on white and turned images by EXIF, unlike the library and the official
    scorers (PIL's convert("RGB")): another score for the same file."""
    from reward_models import get_reward

    folder = tmp_path / "images"
    folder.mkdir()
    rgba = Image.fromarray(render(SCENES[0])).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 40))
    rgba.save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file": "a.png", "prompt": short_caption(SCENES[0])}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert _run(capsys, "--reward", "toy-clip", "--images", folder, "--out", out)[0] == 0
    direct, _ = get_reward("toy-clip")([Image.open(folder / "a.png")], [short_caption(SCENES[0])])
    assert json.loads(out.read_text())["toy-clip"] == pytest.approx(direct.item(), abs=1e-5)


def test_prompt_tables_split_at_line_ends_only(tmp_path):
    """str.splitlines cut a quoted CSV prompt at a form feed or U+2028 into a prompt and two invented files, and
    a JSONL line written with ensure_ascii=False holding U+2028 was 'not JSON'."""
    from reward_models.inputs import _read_table

    prompt = "form\x0cfeed and\u2028sep\x85end"
    table = tmp_path / "p.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["file", "prompt"], ["a.png", prompt], ["b.png", "ok"]])
    assert _read_table(table) == [("a.png", prompt, None), ("b.png", "ok", None)]
    lines = tmp_path / "p.jsonl"
    lines.write_text("\r\n".join(json.dumps({"file": f, "prompt": p}, ensure_ascii=False)
                                 for f, p in (("a.png", prompt), ("b.png", "ok"))) + "\n", encoding="utf-8")
    assert _read_table(lines) == [("a.png", prompt, None), ("b.png", "ok", None)]


def test_prompt_tables_name_the_files_own_line_and_refuse_an_open_quote(tmp_path):
    """A CSV quote left open scored the rows after it as one prompt of one image; a JSONL row's problem named its
    count of non-blank rows, and json's "line 1 column 2" the line's own position."""
    from reward_models.inputs import UsageError, _read_table

    table = tmp_path / "p.csv"
    table.write_text('file,prompt\na.png,a cat\n\nb.png,"a dog, running\nc.png,a bird\n')
    with pytest.raises(UsageError, match=r"p.csv: line 4: unexpected end of data \(a quote left open\? close it"):
        _read_table(table)
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"file": "a.png", "prompt": "a"}\n\n{"prompt": "b"}\n\n{bad\n')
    assert [problem for _, _, problem in _read_table(lines)] == [
        None, "p.jsonl line 3: expected fields 'file' and 'prompt', found ['prompt']",
        "p.jsonl line 5 is not JSON (Expecting property name enclosed in double quotes at column 2): one object per "
        "line"]


def test_a_non_finite_score_is_an_error_of_its_row(tmp_path):
    """A NaN score became a null with no error, and the summary's error count missed it."""
    import torch

    from reward_models.cli import Item, score_items, summarize

    def reward(images, prompts):
        return torch.tensor([1.0, float("nan"), float("inf")]), {}
    items = [Item({"file": f"{i}.png"}, "a red circle", jpeg_bytes(render(SCENES[i]))) for i in range(3)]
    rows, counts = score_items({"fake": reward}, items)
    assert [r["fake"] for r in rows] == [1.0, None, None] and "error" not in rows[0]
    assert rows[1]["error"] == "fake: non-finite score nan" and rows[2]["error"] == "fake: non-finite score inf"
    assert summarize(rows, ["fake"], counts)["errors"] == 2


def test_a_csv_row_of_other_length_than_its_header_is_not_scored(tmp_path):
    """`a.png,a red cat, sitting on a mat` scored the prompt 'a red cat' (the rest went unseen); `b.png` alone
    scored an empty prompt. Each is its row's error now, the other rows scored."""
    from reward_models.inputs import _read_table

    table = tmp_path / "p.csv"
    table.write_text('file,prompt\na.png,a red cat, sitting on a mat\nb.png\nc.png,"a red cat, sitting"\n')
    rows = _read_table(table)
    assert [(file, prompt) for file, prompt, _ in rows] == [("a.png", ""), ("b.png", ""),
                                                            ("c.png", "a red cat, sitting")]
    assert rows[0][2] == ("p.csv line 2 has more fields than the header (a comma in a prompt? put the prompt in "
                          "double quotes)")
    assert rows[1][2].startswith("p.csv line 3 has fewer fields") and rows[2][2] is None


def test_bad_metadata_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    """A metadata.jsonl line without `file`, one that is not JSON, one that is no object and a prompt that is a
    list ended the run with exit 2 and nothing scored (one bad row in 10,000 lost the run), or scored the list's
    repr as the prompt; now each is its row's error, the good rows scored; all bad: exit 2 before any reward loads."""
    folder = _folder(tmp_path)
    good = [json.dumps({"file": f"img_{i}.png", "prompt": short_caption(SCENES[i])}) for i in range(2)]
    bad = ['{"prompt": "b"}', '{"file": ', '["img_2.png", "x"]', json.dumps({"file": "img_3.png", "prompt": ["a"]})]
    (folder / "metadata.jsonl").write_text("\n".join([good[0], *bad, good[1]]) + "\n")
    out = tmp_path / "scores.jsonl"
    code, summary, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["img_0.png", "", "", "", "img_3.png", "img_1.png"]
    assert rows[0]["toy-judge"] is not None and rows[5]["toy-judge"] is not None
    assert [r["error"] for r in rows[1:5]] == [
        "metadata.jsonl line 2: expected fields 'file' and 'prompt', found ['prompt']",
        "metadata.jsonl line 3 is not JSON (Expecting value at column 10): one object per line",
        "metadata.jsonl line 4: expected fields 'file' and 'prompt', found list",
        "metadata.jsonl line 5: the prompt is not text (list)"]
    assert all(r["toy-judge"] is None for r in rows[1:5]) and summary["errors"] == 4

    # no row usable (the file's format, not a row's: another header, a JSON array): an error before any reward loads
    (folder / "metadata.jsonl").write_text("\n".join(bad) + "\n")
    (tmp_path / "p.csv").write_text("image,caption\nimg_0.png,a\n")
    for prompts, line in ((folder / "metadata.jsonl", 1), (tmp_path / "p.csv", 2)):  # the file's line: a header
        code, _, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", prompts, "--out",
                            tmp_path / "all-bad.jsonl")
        assert code == 2 and f"error: no row of {prompts} can be scored (first: {prompts.name} line {line}: expected " \
            "fields 'file' and 'prompt', found [" in err
        assert not (tmp_path / "all-bad.jsonl").exists()


def test_a_binary_caption_column_is_scored_as_its_text(tmp_path, capsys):
    """Captions some tools write as bytes were scored as the text "b'a cat'", as training now reads them."""
    image = jpeg_bytes(render(SCENES[0]))
    pq.write_table(pa.table({"caption": pa.array([short_caption(SCENES[0]).encode()], pa.binary()),
                             "jpg_0": [image], "jpg_1": [image]}), tmp_path / "b.parquet")
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", tmp_path / "b.parquet", "--out",
                            tmp_path / "s.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == [short_caption(SCENES[0])] * 2
    assert summary["rewards"]["toy-judge"]["mean"] == 1.0


def test_a_damaged_row_group_flags_its_rows_and_the_rest_is_scored(tmp_path, capsys):
    """A damaged download (bytes of one row group's page changed) stopped the run with a thrift traceback, the
    later files unscored; a null jpg_1 was said to resolve outside the image folder."""
    rows = _pair_rows()
    rows[1]["jpg_1"] = None
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(table, tmp_path / "b.parquet")
    column = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(1).column(table.schema.names.index("jpg_0"))
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    start = column.data_page_offset
    data[start:start + 40] = bytes(b ^ 0x5A for b in data[start:start + 40])  # the page header
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", tmp_path, "--out", tmp_path / "s.csv")
    assert code == 0 and summary["images"] == 24 and summary["rewards"]["toy-judge"]["n"] == 24 - 6 - 2
    written = list(csv.DictReader((tmp_path / "s.csv").open()))
    errors = {(r["parquet"], r["row"], r["side"]): r["error"] for r in written if r["error"]}
    assert all(errors[("a.parquet", str(row), str(side))].startswith("unreadable row group 1 of the file")
               for row in (3, 4, 5) for side in (0, 1))
    assert errors[("a.parquet", "1", "1")] == errors[("b.parquet", "1", "1")] == "jpg_1 is null: no image in this row"


def test_a_file_name_that_is_not_utf8_is_written_to_csv_as_its_bytes(tmp_path, capsys):
    """The whole run was scored, then its CSV (and the .partial kept instead) failed on the name: nothing written."""
    folder = tmp_path / "images"
    folder.mkdir()
    odd = os.fsdecode(b"\xff.png")
    Image.fromarray(render(SCENES[0])).save(folder / odd)
    (tmp_path / "p.txt").write_text(short_caption(SCENES[0]) + "\n")
    code, _, _ = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", tmp_path / "p.txt",
                      "--out", tmp_path / "s.csv")
    assert code == 0 and b"\xff.png" in (tmp_path / "s.csv").read_bytes()


def test_text_prompts_follow_the_images_numbers_and_a_json_list_is_read_as_prompts(tmp_path, capsys):
    """Sorted as text, 10.png took the second prompt of 11 (a gallery's names); a .json list's lines, brackets and
    quotes included, became the prompts; a .tsv's header became the first."""
    folder = tmp_path / "images"
    folder.mkdir()
    prompts = [short_caption(SCENES[i % len(SCENES)]) for i in range(11)]
    for i in range(11):
        Image.fromarray(render(SCENES[i % len(SCENES)])).save(folder / f"{i}.png")
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    Image.fromarray(render(SCENES[0])).save(folder / "extra.tif")  # skipped without a word before
    with pytest.warns(UserWarning, match=r"1 image file\(s\) of other formats are not scored .*\['extra.tif'\]"):
        main(["--reward", "toy-judge", "--images", str(folder), "--prompts", str(tmp_path / "p.txt"),
              "--out", str(tmp_path / "tif.jsonl")])
    (folder / "extra.tif").unlink()
    capsys.readouterr()
    for given in ("p.txt", "p.json"):
        out = tmp_path / f"{given}.jsonl"
        code, summary, _ = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", tmp_path / given,
                                "--out", out)
        assert code == 0 and summary["rewards"]["toy-judge"]["mean"] == 1.0  # every image with its own caption
        assert [json.loads(line)["file"] for line in out.read_text().splitlines()][:3] == ["0.png", "1.png", "2.png"]
    (tmp_path / "p.tsv").write_text("file\tprompt\n" + "".join(f"{i}.png\t{p}\n" for i, p in enumerate(prompts)))
    code, _, err = _run(capsys, "--reward", "toy-judge", "--images", folder, "--prompts", tmp_path / "p.tsv",
                        "--out", tmp_path / "t.jsonl")
    assert code == 2 and "p.tsv is a .tsv file, which is not read here" in err
