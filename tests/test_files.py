"""Atomic writers: what they leave behind has a plain file's or folder's permissions (umask), not mkstemp's."""
import json
import os
import stat
import time
from pathlib import Path

import numpy as np

import pytest

from t2i_align.files import replace_dir, save_safetensors_atomic, temp_dir, write_json_atomic
from t2i_align.gallery import save_grid


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    import torch

    files = [write_json_atomic(tmp_path / "a.json", {"x": 1}),
             save_safetensors_atomic(tmp_path / "t.safetensors", {"w": torch.zeros(2)}, {}),
             save_grid([np.zeros((4, 4, 3), np.uint8)], tmp_path / "grid.png")]
    assert [mode(f) for f in files] == [0o666 & ~umask] * 3
    folder = temp_dir(tmp_path, ".out.tmp-")
    (folder / "inside.txt").write_text("x")
    out = replace_dir(folder, tmp_path / "out")
    assert mode(out) == 0o777 & ~umask and (out / "inside.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "grid.png", "out", "t.safetensors"]


@pytest.mark.parametrize("failing", [(2,), (2, 3)])
def test_a_failed_replacement_keeps_the_old_folder(tmp_path, monkeypatch, failing):
    """The second rename fails (2,) and the old folder goes back; if putting it back fails too (2, 3), it is kept
    where it was moved and named in the error (it was deleted)."""
    import t2i_align.files as files

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user's")
    new = temp_dir(tmp_path, ".out.tmp-")
    calls, replace = [], os.replace

    def flaky(src, dst):
        calls.append(src)
        if len(calls) in failing:
            raise OSError("disk gone")
        return replace(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(OSError) as err:
        replace_dir(new, tmp_path / "out")
    kept = tmp_path / "out" if failing == (2,) else calls[-1]
    assert (kept / "mine.txt").read_text() == "user's"
    if failing == (2, 3):
        assert f"its old contents are kept in {kept}" in str(err.value)


def test_exports_and_checkpoints_are_readable_like_any_file(tmp_path, umask):
    """safetensors 0.8 writes its files 0600 whatever the umask (safetensors#782); a run's final/ export and
    checkpoints must still be readable by whoever may read the run's other files."""
    from helpers import save_tiny_pipeline
    from t2i_align.loop import train
    from helpers import loop_cfg, write_rendered_pairs

    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    data = write_rendered_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    train(loop_cfg(model, data, out, "lora.enabled=true", "train.max_steps=1", "train.checkpoint_every=1",
               "data.cache=true"))
    written = sorted(out.rglob("*.safetensors")) + sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert {p.parent.name for p in written} >= {"final", "step-1"} and len(written) > 3
    assert {p.name: mode(p) for p in written} == {p.name: 0o666 & ~umask for p in written}


def test_keep_jsonl_drops_later_records_and_a_torn_last_line(tmp_path):
    """A resume rewrites metrics.jsonl / raft_rounds.jsonl up to its checkpoint; a run stopped mid-write left a
    torn last line, on which the resume failed (json.loads) until the user edited the file."""
    from t2i_align.files import keep_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2}\n[3]\n{"step": 3}\n{"step": 4, "lo')
    assert keep_jsonl(path, lambda record: record["step"] <= 2) == 2  # the list and the torn line
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n{"step": 2}\n'


def test_a_resume_keeps_the_metrics_up_to_its_step_despite_a_torn_line(tmp_path, capsys):
    from t2i_align.tracking import Tracker

    tracker = Tracker(tmp_path, wandb_mode="off")
    for step in (1, 2, 3):
        tracker.log({"loss": 0.5}, step)
    with open(tracker.metrics_path, "a") as f:
        f.write('{"step": 4, "lo')
    tracker.truncate_after(2)
    assert [line[:10] for line in tracker.metrics_path.read_text().splitlines()] == ['{"step": 1', '{"step": 2']
    assert "dropped 1 line(s) that were not JSON" in capsys.readouterr().err


def test_metrics_keep_non_finite_values_visible_and_tensors_as_numbers(tmp_path):
    """JSON has no NaN or inf: metrics.jsonl writes them as strings ("nan", "inf"), never as invalid JSON or a
    crash; 0-d tensors are written as numbers."""
    import torch

    from t2i_align.tracking import Tracker

    tracker = Tracker(tmp_path, wandb_mode="off")
    tracker.log({"loss": float("nan"), "grad_norm": float("inf"), "lr": torch.tensor(0.5)}, step=3)
    assert json.loads(tracker.metrics_path.read_text()) == {"step": 3, "loss": "nan", "grad_norm": "inf", "lr": 0.5}


def test_wandb_auto_is_online_only_with_an_api_key(monkeypatch):
    from t2i_align.tracking import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online" and resolve_wandb_mode("off") == "off"
    # W&B's own WANDB_MODE is followed by auto (it went online with a key, waited 95 s without network, then failed)
    for env, mode in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "off"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_wandb_mode("auto") == mode
    with pytest.raises(ValueError, match="unknown tracking.wandb='on'; use one of"):
        resolve_wandb_mode("on")


def test_wandb_online_without_a_key_is_one_line_not_a_prompt(tmp_path, monkeypatch):
    """On a terminal W&B asked for a key at a menu with no time limit (the other processes waiting until the
    run's ddp_timeout); now refused before wandb.init. A key in ~/.netrc counts."""
    import wandb

    from t2i_align.errors import UserError
    from t2i_align.tracking import Tracker

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HOME", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setattr("sys.stdin", type("Terminal", (), {"isatty": lambda self: True})())  # where it prompts
    monkeypatch.setattr(wandb, "init", lambda **kw: pytest.fail("wandb.init reached without a key"))
    with pytest.raises(UserError, match="W&B online needs an API key and none is configured: set WANDB_API_KEY"):
        Tracker(tmp_path / "run", "online")
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit online overrides it: wandb.init would prompt
    with pytest.raises(UserError, match="W&B online needs an API key"):
        Tracker(tmp_path / "run", "online")
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("reached")))
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    (tmp_path / ".netrc").chmod(0o600)
    with pytest.raises(RuntimeError, match="reached"):  # past the check: a configured key
        Tracker(tmp_path / "run", "online")


def test_a_run_without_wandb_drops_an_id_it_does_not_continue(tmp_path):
    """A resume from an earlier checkpoint with W&B off left the abandoned timeline's id (it is copied aside):
    a later resume of the new timeline with W&B on continued that run, which dropped this one's first steps."""
    from t2i_align.tracking import WANDB_ID_FILE, Tracker

    (tmp_path / WANDB_ID_FILE).write_text("old1\n")
    Tracker(tmp_path, "off", run_id="old1").record_run_id()  # the same timeline, continued with W&B off
    assert (tmp_path / WANDB_ID_FILE).read_text() == "old1\n"
    Tracker(tmp_path, "off").record_run_id()  # another timeline
    assert not (tmp_path / WANDB_ID_FILE).exists()


def test_json_results_write_non_finite_numbers_as_null(tmp_path):
    """compare.json held `Infinity` (a t of a constant paired difference): not JSON to strict readers."""
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in JSON"))

    data = {"t": float("inf"), "p": 0.0, "ci": (float("nan"), 1.5), "rows": [{"x": float("-inf")}], "n": 3}
    path = write_json_atomic(tmp_path / "r.json", data)
    assert strict(path.read_text()) == {"t": None, "p": 0.0, "ci": [None, 1.5], "rows": [{"x": None}], "n": 3}
    assert data["t"] == float("inf")  # the caller's data is left as it was


def test_sync_tree_fsyncs_every_file_and_folder_deepest_first(tmp_path, monkeypatch):
    import os

    from t2i_align.files import sync_tree

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    (tmp_path / "a" / "g").write_text("y")
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    sync_tree(tmp_path / "a")
    a = tmp_path / "a"
    assert sorted(synced) == sorted(str(p) for p in (a, a / "b", a / "b" / "f", a / "g"))
    assert synced[0] == str(a / "b" / "f") and synced[-1] == str(a)  # a folder after what it holds


def test_the_write_probe_goes_where_the_command_writes(tmp_path, monkeypatch):
    """A folder replaced whole is built beside it and renamed (its parent must be writable); a folder a command
    adds files to is written inside; output_dir's probe is left to the collective check (probe=False)."""
    import tempfile

    from t2i_align.files import check_output_path

    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    probed = []
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda dir, prefix: probed.append(Path(dir)) or real(dir=dir,
                                                                                                     prefix=prefix))
    check_output_path(out, "--out", folder=True, replaces=[out], overwrite=True)  # replaced whole
    check_output_path(out, "--out", folder=True, replaces=[out / "pairs.parquet"])  # files added inside
    check_output_path(out / "new" / "deeper", "--out", folder=True)  # made: in its nearest existing folder
    check_output_path(out / "scores.jsonl", "--out", folder=False)  # a file: beside it
    check_output_path(out, "output_dir", folder=True, probe=False)
    assert probed == [out.parent, out, out, out]
    assert list(out.iterdir()) == [] and list(out.parent.iterdir()) == [out]  # every probe removed


def test_small_files_are_fsynced_before_the_rename_publishes_them(tmp_path, monkeypatch):
    """A rename of unsynced bytes can leave an empty file after a host crash: each writer fsyncs its temp file."""
    from reward_models.cli import write_rows

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_rows([{"x": 1}], tmp_path / "b.csv")
    replaced = [name for kind, name in events if kind == "replace"]
    assert len(replaced) == 2
    for name in replaced:
        assert events.index(("fsync", name)) < events.index(("replace", name))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.csv").read_text().splitlines() == ["x", "1"]


def test_a_finished_folder_that_cannot_replace_the_old_one_is_kept(tmp_path, monkeypatch):
    """A failed final rename (final/ a mount point) deleted the new export: the run's only copy of its weights."""
    import t2i_align.files as files
    from t2i_align.files import staged_dir

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    calls, replace = [], os.replace

    def busy(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder into place
            raise OSError("Device or resource busy")
        return replace(src, dst)

    monkeypatch.setattr(files.os, "replace", busy)
    with pytest.raises(OSError, match="new contents are kept whole in .*final.unpublished; move them") as err:
        with staged_dir(tmp_path / "final") as tmp:
            (tmp / "weights.safetensors").write_text("new")
    assert "Device or resource busy" in str(err.value)
    assert (tmp_path / "final" / "old.txt").read_text() == "old"
    assert (tmp_path / "final.unpublished" / "weights.safetensors").read_text() == "new"
    with pytest.raises(RuntimeError, match="full disk"):  # one failing while it is filled leaves nothing
        with staged_dir(tmp_path / "gallery"):
            raise RuntimeError("full disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "final.unpublished"]


def test_hidden_folders_a_killed_replacement_left_are_removed_by_the_next_write(tmp_path):
    """A kill while the old final/ was deleted (or a gallery's temporary folder fsynced) left .final.old-* (a whole
    pipeline) beside it for good; a young .tmp-* (another writer's), an .old-* while final/ is missing (maybe its
    only copy) and other names are left alone."""
    from t2i_align.files import staged_dir

    out = tmp_path / "final"
    for name in (".final.old-abc", ".final.tmp-def", ".final.tmp-young", ".gallery.old-x", ".final.older"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"x")
    os.utime(tmp_path / ".final.tmp-def", (time.time() - 7200,) * 2)
    with staged_dir(out) as tmp:  # final/ missing: its .old-* stays
        (tmp / "first").write_text("first")
    kept = [".final.old-abc", ".final.older", ".final.tmp-young", ".gallery.old-x", "final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    with staged_dir(out) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == kept[1:]
    assert (out / "new").read_text() == "new"


def test_a_lock_on_a_file_its_holder_unlinked_is_taken_again_on_the_path(tmp_path, monkeypatch):
    """A run opening the lock file just before its holder unlinked it (letting go) locked the deleted file, while a
    third run locked the new one: both ran. The lock must be on the file the path names."""
    import os

    import t2i_align.files as files

    path = tmp_path / ".out.lock"
    path.write_text("")
    stale = os.open(path, os.O_RDWR)
    path.unlink()  # the holder let go
    real_open, opened = os.open, []

    def open_once_stale(name, flags, mode=0o777):
        opened.append(name)
        return stale if len(opened) == 1 else real_open(name, flags, mode)
    monkeypatch.setattr(files.os, "open", open_once_stale)
    fd = files.take_lock(path, "--out x", "give another --out")
    try:
        assert len(opened) == 2 and os.path.samestat(os.fstat(fd), os.stat(path))
    finally:
        os.close(fd)
