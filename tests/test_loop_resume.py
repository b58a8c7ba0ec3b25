"""Loop correctness found in review (issue 10): train mode, checkpoint timelines, exact resume over corrupt data."""
import json
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align.checkpoints import list_checkpoints, read_marker, resolve_resume
from t2i_align.errors import UserError
from t2i_align.loop import train
from helpers import logged_losses, loop_cfg, write_rendered_pairs


def test_the_unet_trains_in_train_mode_even_after_a_gallery(tiny_model, pairs, tmp_path, monkeypatch):
    """from_pretrained returns eval mode; LoRA dropout (and, on older diffusers, checkpointing) need train mode."""
    from t2i_align.objectives.sft import SFT

    original, modes = SFT.compute_loss, []

    def record(self, *args, **kwargs):
        modes.append(self.ctx.unet.training)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFT, "compute_loss", record)
    train(loop_cfg(tiny_model, pairs, tmp_path / "run", "objective.name=sft", "lora.enabled=true",
               "lora.dropout=0.5", "train.max_steps=3", "tracking.validate_every=1"))
    assert modes == [True, True, True]


def test_resuming_from_an_older_checkpoint_sets_the_newer_timeline_aside(tiny_model, pairs, tmp_path):
    common = ("lora.enabled=true", "objective.beta=100", "train.checkpoint_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.keep_checkpoints=3"))
    old_step2 = read_marker(out / "checkpoints" / "step-2")
    first_metrics, first_final = (out / "metrics.jsonl").read_text(), (out / "final").stat().st_ino
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2", "train.keep_checkpoints=2",
               f"train.resume={out / 'checkpoints' / 'step-1'}"))
    assert [s for s, _ in list_checkpoints(out)] == [1, 2], "keep=2 must keep the checkpoint just written"
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    # the abandoned timeline's later checkpoints, its export and last gallery (both replaced by this run's before),
    # its whole log (this run drops the lines after step 1)
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["final", "gallery", "metrics.jsonl",
                                                                               "step-2", "step-3"]
    assert read_marker(aside[0] / "step-2") == old_step2  # the user's files are moved, not lost
    assert (aside[0] / "final").stat().st_ino == first_final
    assert (aside[0] / "metrics.jsonl").read_text() == first_metrics
    assert "max_steps: 3" in (aside[0] / "step-3" / "config.yaml").read_text()  # each checkpoint holds its config
    assert resolve_resume(out, "latest") == out / "checkpoints" / "step-2"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1"))  # a fresh start takes the abandoned along
    assert not list((out / "checkpoints").glob("abandoned-*"))
    assert (next(out.glob("previous-*")) / aside[0].name / "step-3").is_dir()


def test_a_fresh_start_in_a_used_output_dir_sets_the_earlier_run_aside(tiny_model, pairs, tmp_path):
    """Run again without train.resume: the earlier run's checkpoints and metrics move to previous-<time>/ (a rerun
    appended to metrics.jsonl, and resume=latest could later pick an earlier run's newer checkpoint)."""
    common = ("lora.enabled=true", "objective.beta=100", "train.checkpoint_every=1", "train.log_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3"))
    first = (out / "metrics.jsonl").read_text()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [s for s, _ in list_checkpoints(out)] == [1]
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == first
    assert sorted(p.name for p in aside[0].iterdir()) == ["config.yaml", "final", "gallery", "metrics.jsonl",
                                                          "step-2", "step-3"]  # the last three were replaced
    assert "max_steps: 3" in (aside[0] / "config.yaml").read_text()
    assert (aside[0] / "final" / "pytorch_lora_weights.safetensors").is_file()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2", "train.resume=latest"))  # resumes this run
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len([p for p in out.iterdir() if p.name.startswith("previous-")]) == 1


def test_a_relaunch_with_a_mistake_leaves_the_earlier_run_where_it_was(tiny_model, pairs, tmp_path, capsys):
    """Settings found wrong while the run is built (LoRA targets, too few pairs, a validation reward that cannot
    read the prompts) used to be found after the earlier run had been moved aside, so resume=latest then found
    nothing. Now nothing moves until every setting has passed; resume=latest finding no checkpoint says so and
    names the newest one set aside."""
    from t2i_align.config import ConfigError
    from t2i_align.errors import UserError

    common = ("lora.enabled=true", "objective.beta=100", "train.checkpoint_every=1", "train.log_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    before = sorted(p.name for p in out.iterdir())
    for mistake, error in ((["lora.target_modules=[nothing_like_this]"], UserError),
                           (["train.batch_size=64"], ConfigError),
                           (["tracking.validation_reward=toy-judge", "tracking.validation_prompts=[a cat]"],
                            ConfigError)):
        with pytest.raises(error):
            train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", *mistake))
        assert sorted(p.name for p in out.iterdir()) == before, mistake
    capsys.readouterr()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.resume=latest", "objective.beta=50"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "settings that differ from the checkpoint's run" in capsys.readouterr().err  # beta 100 -> 50
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1", "train.checkpoint_every=0"))  # fresh
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1", "train.resume=latest"))  # finds none
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-") and (p / "step-3").is_dir()]
    told = capsys.readouterr().err
    assert f"(to continue that run instead: train.resume={aside}/step-3)" in told
    assert "train.resume=latest: no complete checkpoint in" in told and "starts fresh" in told
    assert f"the newest earlier checkpoint was set aside: train.resume={aside}/step-3" in told


def test_a_resume_from_a_checkpoint_set_aside_keeps_both_runs(tiny_model, pairs, tmp_path):
    """Resuming, in the same folder, from a checkpoint in previous-*/ (or another run's folder): the run there now
    is set aside in turn, and the resumed run's metrics.jsonl continues the checkpoint's own. Before, it replaced
    the current run's final/ and gallery/ and appended to its metrics.jsonl."""
    common = ("lora.enabled=true", "objective.beta=100", "train.checkpoint_every=1", "train.log_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3"))
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1", "lora.rank=2"))  # sets the first aside
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    second = (out / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", f"train.resume={aside / 'step-2'}"))
    folders = sorted(p for p in out.iterdir() if p.name.startswith("previous-"))
    assert len(folders) == 2 and (folders[1] / "final" / "pytorch_lora_weights.safetensors").read_bytes() == second
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == first[:2]
    assert resumed[2]["loss"] == pytest.approx(first[2]["loss"], abs=1e-6)  # the same step 3 as the first run


def test_resume_is_exact_when_whole_micro_batches_are_corrupt(tiny_model, tmp_path):
    """batch_size 1 and undecodable images: a corrupt micro-batch is replaced by the next one, so the raw
    batches read exceed the steps taken; the checkpoint records how many, and the resumed run skips exactly those."""
    import pyarrow.parquet as pq

    from t2i_align.toy.pairs import write_parquet

    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=8)
    rows = pq.read_table(data).to_pylist()
    for i in (0, 2, 3, 5):
        rows[i]["jpg_0"] = b"\xff\xd8 not a jpeg"
    write_parquet(rows, data)
    common = ("lora.enabled=true", "objective.beta=100", "train.batch_size=1", "train.log_every=1",
              "train.checkpoint_every=2")
    full, part = tmp_path / "full", tmp_path / "part"
    train(loop_cfg(tiny_model, data, full, *common, "train.max_steps=4"))
    train(loop_cfg(tiny_model, data, part, *common, "train.max_steps=2"))
    (raw,) = read_marker(part / "checkpoints" / "step-2")["raw_batches"]  # one count per process
    marker = read_marker(part / "checkpoints" / "step-2")
    assert (marker["engine"], marker["optimizer"], marker["batch_size"]) == ("plain", "adamw", 1)
    assert raw > 2, "this seed must put a corrupt batch among the first two, or the test tests nothing"
    train(loop_cfg(tiny_model, data, part, *common, "train.max_steps=4", "train.resume=latest"))
    assert logged_losses(part) == pytest.approx(logged_losses(full), abs=1e-6)
    last = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data_batches_skipped"] >= 1
    # 4 of 8 rows are corrupt; after 4 steps every corrupt row read was counted, in whole batches too
    assert last["data_rows_skipped"] == last["data_batches_skipped"] >= 1
    # the running totals go on from the checkpoint's (they restarted at 0 before session 21)
    counted = ("data_batches_skipped", "data_rows_skipped", "steps_skipped_nonfinite")
    lines = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    full_lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [[r[k] for k in counted] for r in lines] == [[r[k] for k in counted] for r in full_lines]
    carried = counted + ("prompts_truncated",)  # the text encoders' count is carried too
    assert read_marker(part / "checkpoints" / "step-2")["counts"] == {k: full_lines[1][k] for k in carried}


def test_a_resume_between_log_lines_logs_what_an_uninterrupted_run_logs(tiny_model, pairs, tmp_path,
                                                                         monkeypatch):
    """The metrics since the last log line, and the non-finite streak, restarted at a resume: with log_every=3 and
    a checkpoint at step 2, the step-3 line averaged step 3 alone; a run that would have stopped went on."""
    from t2i_align.loop import NonFiniteError
    from t2i_align.objectives.sft import SFT

    common = ("objective.name=sft", "lora.enabled=true", "train.log_every=3", "train.checkpoint_every=2")
    full, part = tmp_path / "full", tmp_path / "part"
    train(loop_cfg(tiny_model, pairs, full, *common, "train.max_steps=6"))
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=4"))
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=6",
               f"train.resume={part / 'checkpoints' / 'step-2'}"))
    assert len(logged_losses(full)) == 2 and logged_losses(part) == pytest.approx(logged_losses(full), rel=1e-6)
    original = SFT.compute_loss

    def nan_loss(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        return loss * float("nan"), {**metrics, "loss": float("nan")}

    monkeypatch.setattr(SFT, "compute_loss", nan_loss)
    failing = tmp_path / "failing"
    nan = (*common, "train.max_nonfinite_steps=3", "train.checkpoint_every=1", "train.max_steps=10")
    with pytest.raises(NonFiniteError, match=r"last at step 3\)"):
        train(loop_cfg(tiny_model, pairs, failing, *nan))
    marker = read_marker(failing / "checkpoints" / "step-2")
    assert marker["streak"] == 2 and marker["unlogged"][0]["counts"]["loss"] == 0  # no finite loss to average
    assert "NaN" not in json.dumps(marker)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps .*last at step 3\)"):  # not at step 5
        train(loop_cfg(tiny_model, pairs, failing, *nan, "train.resume=latest"))


def test_unlogged_metrics_come_back_per_process_or_not_at_all():
    """Each process its own count and sums (as n entries of their mean: the same log line); with another number
    of processes, or an older marker, none."""
    from types import SimpleNamespace

    from t2i_align.resume import _history

    marker = {"unlogged": [{"n": 2, "sums": {"loss": 3.0}}, {"n": 1, "sums": {"loss": 0.5, "acc": 1.0}}]}
    assert _history(marker, SimpleNamespace(num_processes=2, process_index=0)) == [{"loss": 1.5}, {"loss": 1.5}]
    assert _history(marker, SimpleNamespace(num_processes=2, process_index=1)) == [{"loss": 0.5, "acc": 1.0}]
    assert _history(marker, SimpleNamespace(num_processes=3, process_index=1)) == []
    assert _history({}, SimpleNamespace(num_processes=1, process_index=0)) == []
    nan = {"unlogged": [{"n": 2, "sums": {"loss": "nan", "acc": "inf"}}]}  # as `record` wrote non-finite sums
    (row, _) = _history(nan, SimpleNamespace(num_processes=1, process_index=0))
    assert math.isnan(row["loss"]) and row["acc"] == math.inf
    # since session 36 the finite values' sums and counts: a window with a skipped step's NaN loss comes back as
    # what the uninterrupted run averages (it was all NaN, and the log line after the resume averaged fewer)
    from accelerate import Accelerator

    from t2i_align.loop import _mean_metrics
    from t2i_align.resume import record

    window = [{"loss": 1.0, "acc": 0.5}, {"loss": math.nan, "acc": 1.0}, {"loss": 3.0, "acc": 0.0}]
    one = SimpleNamespace(num_processes=1, process_index=0)
    counts = {"raw_batches": 3, "data_batches_skipped": 0, "data_rows_skipped": 0, "steps_skipped_nonfinite": 1}
    kept = record(Accelerator(cpu=True), counts, {}, window, 1)["unlogged"]
    assert kept == [{"n": 3, "sums": {"acc": 1.5, "loss": 4.0}, "counts": {"acc": 3, "loss": 2}}]
    back = _history({"unlogged": kept}, one)
    assert _mean_metrics(Accelerator(cpu=True), back) == _mean_metrics(Accelerator(cpu=True), window) == \
        {"acc": 0.5, "loss": 2.0}


def test_resume_position_per_process(caplog):
    """Each process resumes at its own count; an old marker's single number serves all; with another number of
    processes no position is exact: each process starts after the steps taken (x grad_accum), with a warning."""
    from t2i_align.checkpoints import resume_raw_batches

    marker = {"step": 4, "raw_batches": [5, 4]}
    assert [resume_raw_batches(marker, i, 2, fallback=4) for i in (0, 1)] == [5, 4]
    assert resume_raw_batches({"step": 4, "raw_batches": 6}, 1, 2, fallback=4) == 6
    assert resume_raw_batches({"step": 4}, 0, 1, fallback=4) == 4
    assert "cannot be resumed exactly" not in caplog.text
    assert resume_raw_batches(marker, 0, 1, fallback=4) == 4  # 2 processes -> 1
    assert "written by 2 processes and this run has 1" in caplog.text


def test_resume_refuses_another_engine_or_sharded_process_count(tmp_path):
    """Checked before the model loads (the engines' own loads failed after it was built): the engine that wrote a
    checkpoint, and under FSDP / DeepSpeed its number of processes; plain checkpoints move between process counts;
    markers from before the engine was recorded pass."""
    from t2i_align.checkpoints import MARKER, CheckpointMismatch
    from t2i_align.resume import check_resume

    def marker(**entries):
        folder = tmp_path / f"step-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps({"step": 4, **entries}))
        return folder

    ddp, zero2 = marker(engine="plain", raw_batches=[4, 4]), marker(engine="deepspeed", raw_batches=[4, 4])
    check_resume(ddp, "plain", 1, 10, tmp_path)  # DDP -> one process
    check_resume(zero2, "deepspeed", 2, 10, tmp_path)
    check_resume(marker(raw_batches=[4, 4]), "fsdp", 4, 10, tmp_path)  # an older marker: the engine's load decides
    with pytest.raises(CheckpointMismatch, match="written under one process or DDP and this run uses FSDP"):
        check_resume(ddp, "fsdp", 2, 10, tmp_path)
    with pytest.raises(CheckpointMismatch, match="written under DeepSpeed and this run uses one process or DDP"):
        check_resume(zero2, "plain", 2, 10, tmp_path)
    with pytest.raises(CheckpointMismatch, match="written by 2 processes under DeepSpeed and this run has 4: launch 2"):
        check_resume(zero2, "deepspeed", 4, 10, tmp_path)
    with pytest.raises(CheckpointMismatch, match="by 2 processes under FSDP and this run has 1"):
        check_resume(marker(engine="fsdp", raw_batches=[4, 4]), "fsdp", 1, 10, tmp_path)
    with pytest.raises(UserError, match="at step 4, past train.max_steps=3"):
        check_resume(ddp, "plain", 2, 3, tmp_path)
    # another optimizer's state (Adafactor failed at its first step on AdamW's: KeyError 'beta1'), fp16 without a
    # loss scaler (accelerate's load failed on scaler.pt, read as a damaged checkpoint), another batch size (warned)
    from t2i_align.config import TrainConfig

    adamw = marker(engine="plain", raw_batches=[4], optimizer="adamw", batch_size=2)
    check_resume(adamw, "plain", 1, 10, tmp_path, train=TrainConfig(optimizer="adamw_fused", batch_size=2))
    with pytest.raises(CheckpointMismatch, match="holds the state of train.optimizer=adamw and this run has "
                                                 "train.optimizer=adafactor"):
        check_resume(adamw, "plain", 1, 10, tmp_path, train=TrainConfig(optimizer="adafactor", batch_size=2))
    with pytest.raises(CheckpointMismatch, match="written without fp16 .no loss-scaler state, scaler.pt."):
        check_resume(adamw, "plain", 1, 10, tmp_path, train=TrainConfig(mixed_precision="fp16", batch_size=2))
    (adamw / "scaler.pt").write_bytes(b"")
    check_resume(adamw, "plain", 1, 10, tmp_path, train=TrainConfig(mixed_precision="fp16", batch_size=2))
    with pytest.warns(UserWarning, match="train.batch_size=2 and this run has 4: .* .rows skipped."):
        check_resume(adamw, "plain", 1, 10, tmp_path, train=TrainConfig(batch_size=4))
    with pytest.raises(CheckpointMismatch, match="written under DeepSpeed"):  # its fp16 keeps no scaler.pt: the
        check_resume(zero2, "plain", 2, 10, tmp_path, train=TrainConfig(mixed_precision="fp16"))  # engine named
    # FSDP / DeepSpeed unpickle their states: a checkpoint from outside the run is warned about (once, on main)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_resume(zero2, "deepspeed", 2, 10, tmp_path)  # the run's own
        check_resume(zero2, "deepspeed", 2, 10, tmp_path / "elsewhere", warn=False)
        check_resume(ddp, "plain", 2, 10, tmp_path / "elsewhere")  # accelerate loads with weights_only=True
    with pytest.warns(UserWarning, match="DeepSpeed reads its checkpoint's states with pickle.*resume only from"):
        check_resume(zero2, "deepspeed", 2, 10, tmp_path / "elsewhere")


class _RecordingAccelerator:
    """Stands in for accelerate's Accelerator where FSDP / DeepSpeed cannot run (no accelerator here)."""

    def __init__(self):
        self.hooks, self.loads = [], []

    def register_save_state_pre_hook(self, hook):
        self.hooks.append(hook)

    def load_state(self, path, **kwargs):
        self.loads.append((path, kwargs))


def test_lora_checkpoint_hooks_under_engines_that_save_the_model_themselves(tmp_path):
    """accelerate's save_state under FSDP / DeepSpeed passes the pre-hook no state dicts (the engine writes the
    sharded model itself): the LoRA-only filter must leave that alone instead of failing, and a resume from such a
    checkpoint (no model.safetensors) goes to the engine's loader without our LoRA key check."""
    from t2i_align.checkpoints import MARKER, save_only_trainable
    from t2i_align.resume import load_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    acc = _RecordingAccelerator()
    save_only_trainable(acc)
    weights = []
    acc.hooks[0]([model], weights, str(tmp_path))  # FSDP / DeepSpeed: no state dicts handed over
    assert weights == []
    weights = [model.state_dict()]
    acc.hooks[0]([model], weights, str(tmp_path))  # one process / DDP: only the trainable weights are kept
    assert sorted(weights[0]) == ["1.bias", "1.weight"]
    (tmp_path / "pytorch_model_fsdp_0").mkdir()
    (tmp_path / MARKER).write_text(json.dumps({"step": 7}))
    assert load_checkpoint(acc, tmp_path, model, trainable_only=True) == 7
    assert acc.loads == [(str(tmp_path), {})]  # no strict=: DeepSpeed's loader takes no such argument


def test_a_setting_a_resume_does_not_apply_keeps_the_checkpoints_value_in_the_record(tiny_model, pairs, tmp_path):
    """train.learning_rate changed at a resume is not applied (the optimizer keeps its saved rate), but config.yaml
    and the next checkpoint's copy recorded the new one: a rate the run never trained at, and the next resume
    reported a change from it."""
    import yaml

    out, common = tmp_path / "run", ("lora.enabled=true", "train.checkpoint_every=2")
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=4", "train.resume=latest",
               "train.learning_rate=5e-2", "train.weight_decay=0.5", "data.prompt_dropout=0.2"))
    for record in (out / "config.yaml", out / "checkpoints" / "step-4" / "config.yaml"):
        saved = yaml.safe_load(record.read_text())
        assert (saved["train"]["learning_rate"], saved["train"]["weight_decay"]) == (1e-3, 1e-2)  # as trained
        assert saved["train"]["resume"] == "latest" and saved["data"]["prompt_dropout"] == 0.2  # applied: the new


def test_a_resume_under_another_method_is_warned(tmp_path):
    """A DPO checkpoint resumed as SFT (or offline DPO as online DPO) went on with a note among the changed settings,
    and offline SFT under online DPO then blamed the data's size: the method's change is said now. A checkpoint
    copied out of its run reads no config two folders up that is not its run's."""
    import warnings

    import yaml

    from t2i_align.checkpoints import MARKER
    from t2i_align.resume import check_resume

    step = tmp_path / "run" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / MARKER).write_text(json.dumps({"step": 2}))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": "dpo"},
                                                                  "raft": {"enabled": False}}))

    def check(path, objective, online):
        check_resume(path, "plain", 1, 10, tmp_path / "run", method=(objective, online))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(step, "dpo", False)  # the same method: nothing said
    with pytest.warns(UserWarning, match=r"step-2 was written by objective 'dpo' and this run is objective 'sft': it "
                                         r"goes on from that run's weights, optimizer moments"):
        check(step, "sft", False)
    with pytest.warns(UserWarning, match=r"this run is objective 'dpo' with online rounds \(raft.enabled\)"):
        check(step, "dpo", True)
    copied = tmp_path / "elsewhere" / "old" / "step-2"  # its run's config is not two folders up
    copied.mkdir(parents=True)
    (copied / MARKER).write_text(json.dumps({"step": 2}))
    (tmp_path / "elsewhere" / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": "sft"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(copied, "dpo", False)


def test_a_checkpoint_given_as_lora_says_how_to_export_it_and_that_works(tiny_model, pairs, tmp_path):
    """`--lora RUN/checkpoints/step-2` said only "no LoRA weights": a checkpoint is training state. The error gives
    the command that exports it (resume at its own step: nothing trained), and that command's final/ samples."""
    from t2i_align.config import load_config
    from t2i_align.models import ModelLoadError
    from t2i_align.sampling import check_weights, load_pipeline

    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=4", "train.checkpoint_every=2"))
    step = out / "checkpoints" / "step-2"
    with pytest.raises(ModelLoadError, match=r"step-2 is a training checkpoint .*export it first with `python "
                                             r"train/train.py --config .*step-2/config.yaml train.resume=.*step-2 "
                                             r"train.max_steps=2 output_dir=OUT`"):
        check_weights(tiny_model, step)
    shutil.copytree(step, tmp_path / "my-ckpt")  # the step from its marker, not its name
    with pytest.raises(ModelLoadError, match=r"my-ckpt/config.yaml train.resume=.*my-ckpt train.max_steps=2 "):
        check_weights(tiny_model, tmp_path / "my-ckpt")
    result = train(load_config(str(step / "config.yaml"), [f"train.resume={step}", "train.max_steps=2",
                                                             f"output_dir={tmp_path / 'at-2'}"]))
    from t2i_align.checkpoints import FINAL_STEP_FILE

    from safetensors.torch import load_file

    assert json.loads((result.final / FINAL_STEP_FILE).read_text()) == {"step": 2}
    at_2, at_4 = (load_file(f / "pytorch_lora_weights.safetensors") for f in (result.final, out / "final"))
    assert at_2.keys() == at_4.keys() and any(not torch.equal(at_2[k], at_4[k]) for k in at_2)  # step 2's, not 4's
    assert load_pipeline(tiny_model, lora=result.final) is not None


def test_the_settings_a_resume_changed_are_listed():
    from t2i_align.resume_settings import changed_settings as _changed_settings

    before = {"output_dir": "a", "objective": {"name": "dpo", "beta": 5000.0}, "train": {"max_steps": 10,
              "resume": None, "learning_rate": 1e-8}}
    now = {"output_dir": "b", "objective": {"name": "sft", "beta": 5000.0}, "train": {"max_steps": 20,
           "resume": "latest", "learning_rate": 2e-8}, "seed": 3}
    assert _changed_settings(before, now) == ["objective.name: 'dpo' -> 'sft'", "seed: None -> 3",
                                              "train.learning_rate: 1e-08 -> 2e-08 (not applied: the checkpoint's "
                                              "optimizer keeps its rate)"]
    # the optimizer's other settings are its saved groups' too (weight decay, betas, eps, AdamW's fused flag)
    assert _changed_settings({"train": {"weight_decay": 0.01}}, {"train": {"weight_decay": 0.0}}) == [
        "train.weight_decay: 0.01 -> 0.0 (not applied: the checkpoint's optimizer keeps its own)"]


def test_a_schedule_resumed_on_another_number_of_processes_is_realigned():
    """8 processes to step 60 of a linear schedule (warm-up 10, 100 steps), resumed on 1: the restored schedule
    stood at 480 of the new run's 100 and the learning rate stayed 0 to the end."""
    from diffusers.optimization import get_scheduler

    from t2i_align.optim import align_lr_schedule

    def schedule(processes):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        return get_scheduler("linear", optimizer=opt, num_warmup_steps=10 * processes,
                             num_training_steps=100 * processes)

    eight = schedule(8)
    for _ in range(60 * 8):
        eight.optimizer.step()
        eight.step()
    one = schedule(1)
    one.optimizer.load_state_dict(eight.optimizer.state_dict())
    one.load_state_dict(eight.state_dict())
    align_lr_schedule(one, 8, 1)
    assert one.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 40 / 90)  # (100 - 60) / (100 - 10)
    one.optimizer.step()
    one.step()
    assert one.get_last_lr()[0] == pytest.approx(1e-4 * 39 / 90)
    lagging = schedule(1)  # 60 steps of which 3 were skipped as non-finite (no schedule step): 57
    for _ in range(57):
        lagging.optimizer.step()
        lagging.step()
    align_lr_schedule(lagging, 1, 1)  # the same number of processes: untouched, lag kept (fp16 resumes exact)
    assert lagging.last_epoch == 57 and lagging.get_last_lr()[0] == pytest.approx(1e-4 * 43 / 90)


def test_only_state_mismatches_are_named_as_such():
    """A damaged file or a CUDA / NCCL fault keeps its own error: "written with other settings?" would mislead."""
    from t2i_align.resume import _is_mismatch

    assert _is_mismatch(RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel: Missing key(s)"))
    assert _is_mismatch(ValueError("loaded state dict contains a parameter group that doesn't match the size"))
    assert _is_mismatch(KeyError("exp_avg"))
    assert not _is_mismatch(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central"))
    assert not _is_mismatch(torch.OutOfMemoryError("CUDA out of memory"))
    assert not _is_mismatch(ValueError("some other value"))


class _OneProcess:
    """The accelerator `save_checkpoint` sees on one process: its state a single empty weights file."""
    is_main_process, process_index, num_processes, distributed_type = True, 0, 1, "NO"

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization=True):
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"")


def test_a_rotation_stopped_halfway_leaves_no_checkpoint_marked_complete(tmp_path, monkeypatch):
    import t2i_align.checkpoints as checkpoints

    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / checkpoints.MARKER).write_text(json.dumps({"step": step}))
    deleted = []

    class Stopped(Exception):
        pass

    def killed(path, ignore_errors=False):  # the process dies before any file of the old checkpoint is gone
        deleted.append(path)
        raise Stopped

    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda p, ignore_errors=False:
                        killed(p) if Path(p).name == "step-1" else None)
    with pytest.raises(Stopped):
        checkpoints.save_checkpoint(_OneProcess(), tmp_path, 3, 2, [torch.zeros(1)])
    assert deleted == [tmp_path / "checkpoints" / "step-1"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # step-1 half-deleted is not offered for resume


def test_a_checkpoint_failing_on_a_full_disk_says_so_and_leaves_no_half_state(tmp_path, monkeypatch):
    """A full disk gave torch's "unexpected pos 77632 vs 77524" as a 40-line traceback, and the half-written state
    stayed, filling the disk for the relaunch too; another failure keeps its own error, its half state removed."""
    import t2i_align.checkpoints as checkpoints

    class Full(_OneProcess):
        def save_state(self, folder, safe_serialization=True):
            super().save_state(folder)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77632 vs 77524")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage._replace(free=3 << 20))
    with pytest.raises(UserError, match=r"checkpoint .*step-3 could not be written: the disk holding it is full "
                                        r"\(3 MiB free; RuntimeError: .*unexpected pos.*train.resume=latest"):
        checkpoints.save_checkpoint(Full(), tmp_path, 3, 2, [torch.zeros(1)])
    assert list((tmp_path / "checkpoints").iterdir()) == []
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage._replace(free=10 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoints.save_checkpoint(Full(), tmp_path, 3, 2, [torch.zeros(1)])
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_the_logs_are_on_the_disk_before_a_checkpoint_is_marked_complete(tmp_path, monkeypatch):
    """metrics.jsonl was appended without fsync while the marker was fsynced: after a host crash its lines up to the
    checkpoint could be gone for good (the resume goes on after them)."""
    import t2i_align.checkpoints as checkpoints

    synced = []
    monkeypatch.setattr(checkpoints, "fsync_path", lambda path: synced.append(Path(path).name))
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    checkpoints.save_checkpoint(_OneProcess(), tmp_path, 3, 2, [torch.zeros(1)])
    assert synced.index("metrics.jsonl") < synced.index(checkpoints.MARKER)


def test_a_killed_checkpoint_writes_folder_goes_with_the_next_checkpoint(tmp_path):
    """Ctrl-C during a checkpoint left checkpoints/.step-15.tmp (a full state: GBs) until step 15 came again."""
    import t2i_align.checkpoints as checkpoints

    (tmp_path / "checkpoints" / ".step-15.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-15.tmp" / "optimizer.bin").write_bytes(b"half")
    checkpoints.save_checkpoint(_OneProcess(), tmp_path, 3, 2, [torch.zeros(1)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]


def test_keep_last_k_removes_a_linked_checkpoint_as_a_link(tmp_path):
    """checkpoints/step-1 a link to an archived checkpoint: the rotation deleted the marker inside the archive
    (through the link) and then left the link (rmtree refuses links)."""
    import t2i_align.checkpoints as checkpoints

    archive = tmp_path / "archive" / "step-1"
    archive.mkdir(parents=True)
    (archive / checkpoints.MARKER).write_text(json.dumps({"step": 1}))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-1").symlink_to(archive)
    checkpoints.save_checkpoint(_OneProcess(), tmp_path / "run", 3, 1, [torch.zeros(1)])
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
    assert (archive / checkpoints.MARKER).is_file()  # the archive still resumes


def test_two_runs_set_aside_in_one_second_get_two_folders(tmp_path, monkeypatch):
    """The folder is named by the second: a second set-aside within it stopped on FileExistsError."""
    from t2i_align.run_dir import set_aside_previous_run

    monkeypatch.setattr(time, "strftime", lambda fmt: "20261201-120000")  # the same second, whatever the clock

    for text in ("first", "second"):
        (tmp_path / "metrics.jsonl").write_text(text)
        set_aside_previous_run(tmp_path, log=lambda message: None)
    assert [(p / "metrics.jsonl").read_text() for p in sorted(tmp_path.iterdir())] == ["first", "second"]


def test_a_final_export_past_the_resumed_step_is_set_aside_and_one_at_it_is_not(tmp_path):
    """Checkpoint at step 2, the run ended (and exported) at 3: resuming from 2 abandons step 3's export. A run
    that ended at its last checkpoint and is extended from it replaces its final/ as it ends (diffusers' way)."""
    from t2i_align.checkpoints import MARKER
    from t2i_align.run_dir import set_aside_newer

    for end, aside in ((3, True), (2, False)):
        out = tmp_path / f"end{end}"
        (out / "checkpoints" / "step-2").mkdir(parents=True)
        (out / "checkpoints" / "step-2" / MARKER).write_text(json.dumps({"step": 2}))
        (out / "final").mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, end + 1)))
        folder = set_aside_newer(out, 2, log=lambda message: None)
        assert (folder is not None) == aside and (out / "final").exists() != aside
        if aside:
            assert sorted(p.name for p in folder.iterdir()) == ["final", "metrics.jsonl"]
    # extended from step 2 (its final/ records step 2), stopped at 3 with a checkpoint, resumed from 2 again: the
    # step-3 checkpoint is abandoned, the step-2 export is this timeline's and stays
    from t2i_align.checkpoints import FINAL_STEP_FILE

    out = tmp_path / "end2"
    (out / "checkpoints" / "step-3").mkdir()
    (out / "checkpoints" / "step-3" / MARKER).write_text(json.dumps({"step": 3}))
    (out / "final" / FINAL_STEP_FILE).write_text(json.dumps({"step": 2}))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 4)))
    folder = set_aside_newer(out, 2, log=lambda message: None)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "step-3"] and (out / "final").is_dir()


def test_a_set_aside_stopped_halfway_is_finished_by_the_relaunch(tmp_path, monkeypatch):
    """Moves came before the log copies: stopped between them, a relaunch found nothing newer, set nothing aside
    and cut metrics.jsonl after the step, so the abandoned steps' lines existed nowhere (and SePPO's later
    snapshots, left behind, were deleted). Now the copies come first and leftovers set aside again."""
    import errno

    from t2i_align import run_dir
    from t2i_align.checkpoints import MARKER
    from t2i_align.snapshots import POOL_DIR

    out = tmp_path / "run"
    for step in (2, 4, 6):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (out / "checkpoints" / f"step-{step}" / MARKER).write_text(json.dumps({"step": step}))
    (out / POOL_DIR).mkdir()
    for step in (2, 4):
        (out / POOL_DIR / f"step-{step}.safetensors").write_text(f"snapshot {step}")
    logged = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 7))
    (out / "metrics.jsonl").write_text(logged)
    real, moves = run_dir.move, []

    def stopped_after_two(src, dst):
        if len(moves) == 2:
            raise KeyboardInterrupt("killed")
        moves.append(src.name)
        real(src, dst)

    monkeypatch.setattr(run_dir, "move", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_dir.set_aside_newer(out, 2, log=lambda message: None)
    monkeypatch.setattr(run_dir, "move", real)
    run_dir.set_aside_newer(out, 2, log=lambda message: None)  # the relaunch
    assert [s for s, _ in list_checkpoints(out)] == [2] and sorted(p.name for p in (out / POOL_DIR).iterdir()) == [
        "step-2.safetensors"]
    aside = sorted((out / "checkpoints").glob("abandoned-*"))
    assert all((a / "metrics.jsonl").read_text() == logged for a in aside)  # each attempt copied the whole log
    found = sorted(p.relative_to(a).as_posix() for a in aside for p in a.rglob("*") if p.name != "metrics.jsonl")
    assert [f for f in found if not f.endswith(MARKER)] == sorted(
        [POOL_DIR, POOL_DIR, f"{POOL_DIR}/step-2.safetensors", f"{POOL_DIR}/step-2.safetensors",
         f"{POOL_DIR}/step-4.safetensors", "step-4", "step-6"])
    # across file systems (checkpoints/ a link to a scratch disk) a rename fails with EXDEV: copied, then deleted
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_text("weights")
    rename, copytree, copied = os.rename, shutil.copytree, []

    def other_disk(src, dst, *args, **kwargs):  # Path.rename and shutil.move both come here
        if Path(src).name in ("final", "step-9"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", other_disk)
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: copied.append(a[0]) or copytree(*a, **k))
    folder = run_dir.set_aside_newer(out, 1, log=lambda message: None)
    assert (folder / "final" / "model.safetensors").read_text() == "weights" and not (out / "final").exists()
    assert [Path(p).name for p in copied] == ["final"]  # copied, not renamed
    # a fresh start would copy every old checkpoint back off the scratch disk: refused, nothing moved
    (out / "checkpoints" / "step-9").mkdir()
    (out / "checkpoints" / "step-9" / MARKER).write_text(json.dumps({"step": 9}))
    with pytest.raises(UserError, match="step-9 aside into .*different file systems .*a new output_dir"):
        run_dir.set_aside_previous_run(out, log=lambda message: None)


def test_processes_that_find_different_latest_checkpoints_stop_together(tmp_path, monkeypatch):
    """Each process resolved train.resume=latest on its own: a machine with a stale network file system listing
    resumed from an older step, training other weights for another length (a hang, or silent divergence)."""
    from types import SimpleNamespace

    import accelerate.utils

    from t2i_align.checkpoints import resolve_resume_everywhere
    from t2i_align.errors import UserError

    newest = tmp_path / "checkpoints" / "step-4"
    newest.mkdir(parents=True)
    (newest / "t2i_align_checkpoint.json").write_text("{}")
    two = SimpleNamespace(num_processes=2)
    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda objs: [objs[0], (tmp_path / "checkpoints" / "step-2", None)])
    with pytest.raises(UserError, match="the processes found different checkpoints .*step-2, .*step-4"):
        resolve_resume_everywhere(two, tmp_path, "latest")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: objs * 2)
    assert resolve_resume_everywhere(two, tmp_path, "latest") == newest
    # a folder one machine cannot see: it raised before the gather, the others waited there for ddp_timeout (3 h)
    unseen = "train.resume='/elsewhere/step-4' does not exist"
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [(newest, None), *objs])
    with pytest.raises(FileNotFoundError, match=r"does not exist; .* \(on 1 of 2 processes: is the folder on a file"):
        resolve_resume_everywhere(two, tmp_path, "/elsewhere/step-4")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [*objs, (None, unseen)])
    with pytest.raises(FileNotFoundError, match="on 1 of 2 processes"):  # this process saw it, another did not
        resolve_resume_everywhere(two, tmp_path, str(newest))
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: objs * 2)  # a typo: no machine sees it
    with pytest.raises(FileNotFoundError, match=r"step-4' does not exist; use [^(]*$"):  # no shared-disk hint
        resolve_resume_everywhere(two, tmp_path, "/elsewhere/step-4")


def test_a_new_export_moves_aside_a_final_holding_files_no_export_writes(tmp_path):
    """A run extended from the step it ended at replaces final/ as it ends: samples generated into final/ (or any
    file a user put there) were deleted with it. Now that final/ is moved to final-kept-1/ whole."""
    from helpers import export_random_lora

    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    run = tmp_path / "run"
    export_random_lora(model, run)
    (run / "final" / ".DS_Store").write_bytes(b"a file browser's")
    export_random_lora(model, run)  # only what an export writes, and a file browser's leftovers: nothing kept
    assert not (tmp_path / "run" / "final-kept-1").exists()
    (run / "final" / "samples").mkdir()
    (run / "final" / "samples" / "0.png").write_bytes(b"a sample")
    final = export_random_lora(model, run)
    assert (run / "final-kept-1" / "samples" / "0.png").read_bytes() == b"a sample"
    assert not (final / "samples").exists() and (final / "pytorch_lora_weights.safetensors").is_file()
    from t2i_align.run_dir import set_aside_previous_run  # a fresh start there takes it along with final/

    aside = set_aside_previous_run(run, log=lambda message: None)
    assert (aside / "final-kept-1" / "samples" / "0.png").is_file() and not (run / "final-kept-1").exists()


def test_a_final_that_links_elsewhere_has_its_target_moved_aside_before_it_is_replaced(tmp_path):
    """The export replaces the folder a final/ link points to: a note added there was deleted with it."""
    from helpers import export_random_lora

    model, run = save_tiny_pipeline("sd15", tmp_path / "sd15"), tmp_path / "run"
    export_random_lora(model, tmp_path / "archive")
    run.mkdir()
    (run / "final").symlink_to(tmp_path / "archive" / "final")
    (tmp_path / "archive" / "final" / "notes.txt").write_text("kept")
    final = export_random_lora(model, run)
    assert (run / "final").is_symlink() and (final / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "archive" / "final-kept-1" / "notes.txt").read_text() == "kept"


def test_a_resume_on_data_of_another_size_is_warned(tiny_model, tmp_path):
    """The marker counts batches, and the order is drawn from the rows: with rows added or removed since (a
    download still under way at the first start) the resumed epoch repeated or skipped rows without a word."""
    data, out = write_rendered_pairs(tmp_path / "pairs.parquet", n=8), tmp_path / "run"
    train(loop_cfg(tiny_model, data, out, "train.checkpoint_every=1", "train.max_steps=1"))
    assert read_marker(out / "checkpoints" / "step-1")["data_rows"] == 8
    write_rendered_pairs(data, n=6)
    with pytest.warns(UserWarning, match="step-1 was written with 8 usable data rows and this run has 6: the data "
                                         "changed since"):
        train(loop_cfg(tiny_model, data, out, "train.checkpoint_every=1", "train.max_steps=2", "train.resume=latest"))
    assert read_marker(out / "checkpoints" / "step-2")["data_rows"] == 6


def test_a_checkpoint_that_does_not_fit_is_refused_before_the_earlier_run_is_set_aside(tiny_model, pairs, tmp_path):
    """Resumed with another LoRA rank (or as a full fine-tune), the load failed after claim_output had moved the
    output folder's own run into previous-* and rewritten its config.yaml."""
    from t2i_align.checkpoints import CheckpointMismatch

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "lora.rank=4", "train.max_steps=2",
                   "train.checkpoint_every=2"))
    before = sorted(p.name for p in a.iterdir()), (a / "config.yaml").read_text()
    step = b / "checkpoints" / "step-2"
    for extra, told in ((("lora.enabled=true", "lora.rank=2"), "weights this run trains, as shaped here"),
                        (("lora.enabled=false",), "weights this run trains, as shaped here")):
        with pytest.raises(CheckpointMismatch, match=told):
            train(loop_cfg(tiny_model, pairs, a, *extra, "train.max_steps=4", f"train.resume={step}"))
        assert (sorted(p.name for p in a.iterdir()), (a / "config.yaml").read_text()) == before


def test_a_checkpoint_whose_deletion_was_killed_halfway_is_removed_at_the_next_checkpoint(tiny_model, pairs, tmp_path):
    """keep_checkpoints deletes a checkpoint's marker first; killed after that, its unmarked step-N (GBs for a full
    fine-tune) was never pruned."""
    out = tmp_path / "run"
    half = out / "checkpoints" / "step-1"
    half.mkdir(parents=True)
    (half / "optimizer.bin").write_bytes(b"left by a killed deletion")
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=2", "train.checkpoint_every=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_a_resume_that_changes_the_model_is_refused_and_a_linked_checkpoint_resumes_in_place(tiny_model, pairs,
                                                                                             tmp_path):
    """A resume with another seed, LoRA alpha or existing base folder loaded the adapters anyway (one info line);
    a checkpoint linked to an archive was read as another folder's: the run set itself aside and failed."""
    from t2i_align.checkpoints import CheckpointMismatch

    common = ("lora.enabled=true", "objective.beta=100", "train.checkpoint_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    archive = tmp_path / "archive" / "step-2"
    shutil.move(out / "checkpoints" / "step-2", archive)
    (out / "checkpoints" / "step-2").symlink_to(archive)
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    for change, named in (("seed=7", "seed=0 (now 7)"), ("lora.alpha=16", "lora.alpha / lora.rank = 1 (now 2)"),
                          (f"model.pretrained={other}", "model.pretrained=")):
        with pytest.raises(CheckpointMismatch, match=re.escape(named)):
            train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.resume=latest", change))
    assert not list(out.glob("previous-*"))
    logged = (out / "metrics.jsonl").read_text()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.resume=latest"))
    assert not list(out.glob("previous-*")) and (out / "checkpoints" / "step-2").is_symlink()
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert (out / "metrics.jsonl").read_text().startswith(logged)
    assert len(logged_losses(out)) == len(logged.splitlines()) + 1


def test_a_moved_base_folder_may_be_named_anew_on_a_resume(tmp_path):
    from t2i_align.checkpoints import CheckpointMismatch
    from t2i_align.resume_settings import check_same_model

    (tmp_path / "base").mkdir()
    (tmp_path / "ck").mkdir()
    recorded = {"seed": 0, "model": {"pretrained": str(tmp_path / "gone")}, "lora": {"alpha": None}}
    (tmp_path / "ck" / "config.yaml").write_text(yaml.safe_dump(recorded))
    now = {"seed": 0, "model": {"pretrained": str(tmp_path / "base"), "vae": None},
           "lora": {"alpha": None, "target_modules": ["to_q"]}, "data": {"resolution": 64}}
    check_same_model(tmp_path / "ck", now)  # the recorded base is gone; keys the file predates are not compared
    recorded["model"]["pretrained"] = str(tmp_path / "ck")  # an existing other folder
    (tmp_path / "ck" / "config.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(CheckpointMismatch, match="model.pretrained="):
        check_same_model(tmp_path / "ck", now)
    recorded["model"]["pretrained"] = str(tmp_path / "base" / ".." / "base")  # the same folder, spelled otherwise
    (tmp_path / "ck" / "config.yaml").write_text(yaml.safe_dump(recorded))
    check_same_model(tmp_path / "ck", now)


def test_a_second_run_on_an_output_dir_in_use_is_refused_and_the_lock_goes_with_the_run(tiny_model, pairs, tmp_path):
    """Two launches on one folder (a job requeued while it still ran) set each other's checkpoints aside and
    deleted each other's unfinished checkpoint and export: the second now stops at start, naming the first."""
    from t2i_align.run_dir import take_output_lock

    out = tmp_path / "run"
    held = take_output_lock(out)  # as the first run holds it
    try:
        with pytest.raises(UserError, match=r"output_dir .*run is in use by another run \(process \d+ on .*since "
                                            r".*\): wait for it"):
            train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=1"))
        assert sorted(p.name for p in out.iterdir()) == [".t2i-align.lock"]
    finally:
        os.close(held)
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=1"))
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=2", "train.resume=latest"))
    os.close(take_output_lock(out))  # each run let it go at its end


def test_a_resume_that_extends_a_decaying_schedule_is_warned(tmp_path):
    """A linear schedule at rate 0 after 1000 of 1000 steps went on at half the peak rate for max_steps=2000,
    without a word."""
    from t2i_align.resume_settings import check_same_model

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 1000, "lr_scheduler": "linear"}}))
    with pytest.warns(UserWarning, match="towards train.max_steps=1000; its linear learning-rate schedule is rebuilt "
                                         "for 2000"):
        check_same_model(tmp_path, {"train": {"max_steps": 2000, "lr_scheduler": "linear"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_model(tmp_path, {"train": {"max_steps": 1000, "lr_scheduler": "linear"}})
        check_same_model(tmp_path, {"train": {"max_steps": 2000, "lr_scheduler": "constant"}})
        check_same_model(tmp_path, {"train": {"max_steps": 2000, "lr_scheduler": "linear"}}, warn=False)  # others
        from t2i_align.checkpoints import MARKER

        (tmp_path / MARKER).write_text(json.dumps({"step": 400}))  # the export command: max_steps = its step
        check_same_model(tmp_path, {"train": {"max_steps": 400, "lr_scheduler": "linear"}})


def test_a_resume_with_values_that_compute_the_same_is_not_refused(tmp_path):
    """alpha 8 at rank 8 is alpha None; a token budget under clip77 and family auto say nothing; LoRA's alpha
    without LoRA neither. A real change still is refused."""
    from t2i_align.checkpoints import CheckpointMismatch
    from t2i_align.resume_settings import check_same_model

    recorded = {"seed": 0, "lora": {"enabled": True, "rank": 8, "alpha": None},
                "model": {"family": "auto", "text_encoding": {"kind": "clip77", "token_budget": 240}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    same = {"seed": 0, "lora": {"enabled": True, "rank": 8, "alpha": 8.0},
            "model": {"family": "sd15", "text_encoding": {"kind": "clip77", "token_budget": 120}}}
    check_same_model(tmp_path, same)
    with pytest.raises(CheckpointMismatch, match=r"lora.alpha / lora.rank = 1 \(now 2\)"):
        check_same_model(tmp_path, {**same, "lora": {"enabled": True, "rank": 8, "alpha": 16.0}})
    with pytest.raises(CheckpointMismatch, match="model.text_encoding="):
        check_same_model(tmp_path, {**same, "model": {"family": "sd15", "text_encoding": {"kind": "segments",
                                                                                             "token_budget": 240}}})
    recorded["lora"] = {"enabled": False, "rank": 8, "alpha": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    check_same_model(tmp_path, {**same, "lora": {"enabled": False, "rank": 8, "alpha": 32.0}})


def test_a_resume_through_a_link_to_a_checkpoint_of_this_run_keeps_the_run_in_place(tmp_path):
    """train.resume=~/latest, a link to output_dir/checkpoints/step-2: read as another folder's, the run set its
    own checkpoints aside (the link then dangling) and failed."""
    from t2i_align.run_dir import prepare_run_dir

    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "latest").symlink_to(out / "checkpoints" / "step-2")
    prepare_run_dir(out, tmp_path / "latest", str(tmp_path / "latest"), log=lambda message: None)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]


def _cut(file: Path) -> None:  # a copy that stopped half-way
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])


@pytest.mark.parametrize("name, damage", [
    ("optimizer.bin", lambda f: f.write_bytes(b"overwritten " * 8)),
    ("model.safetensors", _cut),
    ("random_states_0.pkl", _cut),  # accelerate skips RNG states it cannot load, with an info line only
])
def test_a_damaged_checkpoint_file_is_named_before_anything_is_set_aside(tiny_model, pairs, tmp_path, name, damage):
    """A damaged file was a traceback (torch's advice to load with weights_only=False for a cut optimizer.bin) after
    the earlier run was set aside, or (RNG states) a resume that went on inexactly without a word."""
    from t2i_align.checkpoints import CheckpointDamaged

    common = ("lora.enabled=true", "train.checkpoint_every=1")
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    bad = tmp_path / "copied-step-2"
    shutil.copytree(out / "checkpoints" / "step-2", bad)
    damage(bad / name)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointDamaged, match=f"{bad}: its file {re.escape(name)} cannot be read .*: cut short "
                                                r"or overwritten\? resume from another checkpoint"):
        train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", f"train.resume={bad}"))
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier run is where it was
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.resume=latest"))  # a sound one resumes
    assert [s for s, _ in list_checkpoints(out)][-1] == 3


def test_a_damaged_marker_is_named_and_a_past_the_end_hint_names_that_run_s_export(tmp_path):
    from t2i_align.checkpoints import MARKER, CheckpointDamaged
    from t2i_align.resume import check_resume

    step = tmp_path / "other" / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    for text in ("{not json", "[4]", '{"steps": 4}'):
        (step / MARKER).write_text(text)
        with pytest.raises(CheckpointDamaged, match=f"its file {MARKER} cannot be read"):
            check_resume(step, "plain", 1, 10, tmp_path / "run")
    (step / MARKER).write_text('{"step": 4}')
    with pytest.raises(UserError, match=r"past train.max_steps=3; set train.max_steps above it to train on$"):
        check_resume(step, "plain", 1, 3, tmp_path / "run")  # no export to point to; not this run's final/
    (tmp_path / "other" / "final").mkdir()
    with pytest.raises(UserError, match=f"or use that run's export {tmp_path / 'other' / 'final'} "):
        check_resume(step, "plain", 1, 3, tmp_path / "run")


def test_find_damaged_reads_what_accelerate_loads_as_it_loads_it(tmp_path):
    """RNG states accelerate skips where weights_only refuses them (another numpy's) pass if whole; a refused
    pickle is named by what was refused, not with torch's advice to load it with weights_only=False; a macOS copy's
    ._ files and other ranks' names are not accelerate's files."""
    import argparse

    from safetensors.torch import save_file

    from t2i_align.checkpoints import find_damaged

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer.bin")
    torch.save({"numpy_random_seed": argparse.Namespace()}, tmp_path / "random_states_0.pkl")  # refused, whole
    (tmp_path / "._optimizer.bin").write_bytes(b"AppleDouble")
    assert find_damaged(tmp_path) is None
    torch.save(argparse.Namespace(), tmp_path / "optimizer.bin")
    told = str(find_damaged(tmp_path))
    assert "its file optimizer.bin holds a pickle that weights_only loading refuses (Unsupported global" in told
    assert "argparse.Namespace was not an allowed global by default): not written by accelerate" in told
    assert "weights_only=False" not in told and "add_safe_globals" not in told and "\x1b" not in told


def test_a_set_aside_stopped_by_a_kill_is_finished_in_the_same_folder(tmp_path, monkeypatch):
    """A kill while a fresh start moved the earlier run aside: the relaunch moved the rest into a second folder."""
    from t2i_align import run_dir

    for name in ("metrics.jsonl", "config.yaml"):
        (tmp_path / name).write_text(name)
    move = run_dir.move

    def killed(src, dst, **kwargs):
        move(src, dst, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(run_dir, "move", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dir.set_aside_previous_run(tmp_path, log=lambda message: None)
    monkeypatch.undo()
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261201-120001")  # another second than the first folder's
    aside = run_dir.set_aside_previous_run(tmp_path, log=lambda message: None)
    assert [p.name for p in tmp_path.iterdir()] == [aside.name]
    assert sorted(p.name for p in aside.iterdir()) == ["config.yaml", "metrics.jsonl"]  # the marker is gone
    # a marker folder that already holds a file of the same name is not reused (it would be replaced)
    (aside / run_dir.SETTING_ASIDE).touch()
    (tmp_path / "metrics.jsonl").write_text("later")
    second = run_dir.set_aside_previous_run(tmp_path, log=lambda message: None)
    assert second != aside and (second / "metrics.jsonl").read_text() == "later"
    assert (aside / "metrics.jsonl").read_text() == "metrics.jsonl"


def test_the_config_of_a_run_that_stopped_before_training_is_not_set_aside(tmp_path):
    """A run refused after writing config.yaml (its model did not load) left it, and each later start moved it into
    a previous-* folder of its own."""
    from t2i_align.run_dir import set_aside_previous_run

    (tmp_path / "config.yaml").write_text("a run that never trained")
    assert set_aside_previous_run(tmp_path, log=lambda message: None) is None
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # one that trained: both set aside, as before
    aside = set_aside_previous_run(tmp_path, log=lambda message: None)
    assert sorted(p.name for p in aside.iterdir()) == ["config.yaml", "metrics.jsonl"]
