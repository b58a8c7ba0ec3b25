"""User mistakes end as ONE line `error: ...` with exit code 2; our bugs keep their tracebacks (issue 10, bug 11)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align.errors import DEBUG_ENV, UserError, one_line, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "train" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raise(err):
    def main():
        raise err
    return main


def test_a_user_error_is_one_line_and_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    code = run_cli(_raise(UserError("checkpoint x does not fit:\n  missing keys (2): a, b")))
    assert code == 2
    assert capsys.readouterr().err == "error: checkpoint x does not fit: missing keys (2): a, b\n"


def test_a_missing_file_names_the_file(capsys):
    assert run_cli(_raise(FileNotFoundError(2, "No such file or directory", "runs/x.parquet"))) == 2
    assert capsys.readouterr().err == "error: No such file or directory: runs/x.parquet\n"
    assert run_cli(_raise(PermissionError(13, "Permission denied", "runs/ro/metrics.jsonl"))) == 2  # unwritable
    assert capsys.readouterr().err == "error: Permission denied: runs/ro/metrics.jsonl\n"


def test_a_full_or_read_only_disk_is_one_line_and_other_os_errors_keep_their_traceback(capsys, monkeypatch):
    """A run's write failing on a full disk (saving config.yaml at a relaunch) was a traceback."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_cli(_raise(OSError(28, "No space left on device", "runs/x/config.yaml"))) == 2
    assert capsys.readouterr().err == ("error: No space left on device: runs/x/config.yaml: free space or write "
                                       "elsewhere, then run again\n")
    assert run_cli(_raise(OSError(30, "Read-only file system", "runs/x"))) == 2
    with pytest.raises(OSError):
        run_cli(_raise(OSError(5, "Input/output error")))
    from t2i_align.errors import describe  # told to the other processes of a run as a user error too

    assert describe(OSError(28, "No space left on device"))[0] and not describe(OSError(5, "I/O error"))[0]


def test_safetensors_full_disk_error_is_one_line_too(capsys, monkeypatch):
    """safetensors' error for a full disk is not an OSError: an export, a cache or a merge filling it was a
    traceback."""
    from safetensors import SafetensorError

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert run_cli(_raise(full)) == 2
    assert capsys.readouterr().err == ("error: Error while serializing: I/O error: No space left on device (os error "
                                       "28): free space or write elsewhere, then run again\n")
    with pytest.raises(SafetensorError):  # another safetensors error: ours to see
        run_cli(_raise(SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")))


def test_training_on_a_full_disk_says_where_to_resume(tmp_path, capsys, monkeypatch):
    """An export or gallery filling the disk said "free space ... then run again": the same command again started
    a fresh run (setting the finished one aside), where train.resume=latest finishes it."""
    import t2i_align.loop as loop
    from safetensors import SafetensorError

    from t2i_align.checkpoints import MARKER

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    step = tmp_path / "run" / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / MARKER).write_text(json.dumps({"step": 4}))
    base = ["--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), f"output_dir={tmp_path / 'run'}"]
    for failure, said in ((SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                           "28)"), "No space left on device (os error 28)"),
                          (UserError("the main process could not log metrics: No space left on device: m.jsonl: "
                                     "free space or write elsewhere, then run again"),  # another process's view
                           "could not log metrics: No space left on device: m.jsonl")):
        monkeypatch.setattr(loop, "train", lambda cfg, failure=failure: _raise(failure)())
        assert _train_script().main(base) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and said in err and len(err.splitlines()) == 1
        assert err.endswith(f": free space or write elsewhere. The newest complete checkpoint is {step}: continue "
                            "with train.resume=latest and this output_dir.") and "run again" not in err
    monkeypatch.setattr(loop, "train", lambda cfg: _raise(UserError("a mistake"))())
    assert _train_script().main(base) == 2 and capsys.readouterr().err == "error: a mistake\n"


def test_our_bugs_keep_their_traceback_and_debug_re_raises_user_errors(monkeypatch):
    with pytest.raises(KeyError):
        run_cli(_raise(KeyError("a bug")))
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        run_cli(_raise(UserError("shown with its traceback")))
    assert run_cli(lambda: 0) == 0


def test_errors_defined_before_user_error_are_reported_too(capsys):
    from t2i_align.models import ModelLoadError

    assert run_cli(_raise(ModelLoadError("model.pretrained: /nowhere does not exist"))) == 2
    assert one_line(ValueError("")) == "ValueError"
    assert capsys.readouterr().err.startswith("error: model.pretrained")
    from wandb.errors.errors import UsageError as WandbUsageError  # W&B online without an API key

    assert run_cli(_raise(WandbUsageError("No API key configured. Use `wandb login` to log in."))) == 2
    assert capsys.readouterr().err == "error: No API key configured. Use `wandb login` to log in.\n"


def test_reward_setup_mistakes_are_user_errors_and_still_value_errors():
    from reward_models import get_reward

    for name, options in (("hpsv2", {"version": "v3", "checkpoint": __file__}), ("toy-jduge", {}),
                          ("clip", {"weights": "x.pt"})):
        with pytest.raises(UserError) as info:
            get_reward(name, **options)
        assert isinstance(info.value, ValueError)  # t2i-score and older callers catch ValueError
    # an option the reward does not take (raft.reward_options, reward_backprop.reward_options) was a bare TypeError
    assert re.fullmatch(r"reward 'clip' has no option\(s\) \['weights'\]; it takes: .*checkpoint.*", str(info.value))


def test_train_script_with_a_missing_data_path_prints_one_error_line(tmp_path):
    """The shipped toy config before `python -m t2i_align.toy pairs`: used to end in a 30-line traceback."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train" / "train.py"), "--config", str(REPO_ROOT / "configs/toy/dpo.yaml"),
         f"data.path={tmp_path / 'no-pairs' / 'pairs.parquet'}", f"output_dir={tmp_path / 'run'}",
         "tracking.wandb=off"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-pairs" in last
    assert "Traceback" not in proc.stderr


def test_train_script_refuses_half_precision_weights_without_mixed_precision(capsys):
    """Used to die in F.linear ("expected m1 and m2 to have the same dtype") on the first forward."""
    code = _train_script().main(["--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), "model.weight_dtype=bf16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: model.weight_dtype = 'bf16'") and "train.mixed_precision=bf16" in err


def test_a_dry_run_checks_the_rewards_weights_and_the_gallery_reward_takes_options(tmp_path, capsys, monkeypatch):
    """`--dry-run` passed a reward whose weights were missing or mistyped (the run failed once the model had
    loaded), and tracking.validation_reward had no options: no real reward could be shown under a gallery."""
    import t2i_align.build as build

    monkeypatch.setattr(build, "load_components", _raise(AssertionError("loaded the model")))
    monkeypatch.setenv("HOME", str(tmp_path))
    base = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/raft.yaml"), f"output_dir={tmp_path / 'run'}"]
    cases = [(["tracking.validation_reward=pickscore"], "tracking.validation_reward: reward 'pickscore': no "
              "model_dir was given"),
             (["raft.reward=hpsv2", "raft.reward_options.checkpoint=~/HPS_v2.1_compressed.pt"],
              f"raft.reward: reward 'hpsv2': checkpoint={tmp_path}/HPS_v2.1_compressed.pt does not exist")]
    for overrides, told in cases:
        assert _train_script().main([*base, *overrides]) == 2
        assert capsys.readouterr().err.startswith(f"error: {told}")
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"")
    from reward_models import get_reward
    from reward_models.base import WeightsNotFoundError

    (tmp_path / "2024").mkdir()  # a YAML number as a path: text, as t2i-score --option gives it (a TypeError)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="2024 has neither open_clip_config.json"):  # past the checks
        get_reward("clip", checkpoint=2024, arch="ViT-B-32")
    monkeypatch.chdir(REPO_ROOT)
    # the gallery's reward loads on the main process alone: another (another machine) need not hold its weights
    from t2i_align.build import check_before_loading
    from t2i_align.config import ConfigError, load_config

    cfg = load_config(REPO_ROOT / "configs/toy/raft.yaml", ["tracking.validation_reward=pickscore"])
    check_before_loading(cfg, "images", gallery_weights=False)
    with pytest.raises(ConfigError, match="no model_dir was given"):
        check_before_loading(cfg, "images")
    assert _train_script().main([*base, "raft.reward=hpsv2", "raft.reward_options.checkpoint=~/HPS_v2.1_compressed.pt",
                                 "tracking.validation_reward=clip", "tracking.validation_reward_options.checkpoint=toy"
                                 ]) == 0


def test_a_dry_run_counts_the_usable_pairs_as_the_run_would(tmp_path, capsys):
    """All ties, no pair of the wanted models, fewer pairs than a batch: the dry run passed each, the run refused it
    after the model loaded (minutes on SDXL)."""
    from helpers import write_rendered_pairs

    base = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), f"output_dir={tmp_path / 'run'}"]
    ties = write_rendered_pairs(tmp_path / "ties.parquet", n=2, tie_every=1)
    three = write_rendered_pairs(tmp_path / "three.parquet", n=3)
    for extra, told in (([f"data.path={ties}"], "no usable pairs in .*ties.parquet .*ties dropped=2"),
                        ([f"data.path={three}", "data.both_models_contain=dream"], "no usable pairs .*other models=3"),
                        ([f"data.path={three}", "train.batch_size=4"], "3 usable pairs in .*three.parquet are too few "
                                                                        "for train.batch_size=4 on one process")):
        assert _train_script().main([*base, *extra]) == 2
        assert re.search(told, capsys.readouterr().err.splitlines()[-1]), told
    assert _train_script().main([*base, f"data.path={three}", "train.batch_size=3"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"data .*three.parquet: .*used=3", err) and "decode" not in err.replace("are decoded when", "")
    # images that are not image files: the run stopped after an epoch, the dry run said nothing
    junk = pq.read_table(three).to_pylist()
    pq.write_table(pa.Table.from_pylist([{**row, "jpg_0": b"junk", "jpg_1": b"junk"} for row in junk]),
                   tmp_path / "junk.parquet")
    assert _train_script().main([*base, f"data.path={tmp_path / 'junk.parquet'}", "train.batch_size=3"]) == 0
    assert "note: none of the first 3 pairs' images decode" in capsys.readouterr().err
    # a misspelt LoRA target: found on the UNet built from its config, no weights loaded
    assert _train_script().main([*base, f"data.path={three}", "train.batch_size=3", "lora.enabled=true",
                                 "lora.target_modules=[to_q,to_qq]"]) == 2
    assert "lora.target_modules: ['to_qq'] match no layer of the UNet" in capsys.readouterr().err


def test_a_second_config_is_refused_and_an_empty_one_warned(tmp_path, capsys, monkeypatch):
    """argparse kept the last --config silently (a DPO recipe then SFT trained SFT); an empty file set nothing."""
    dpo, sft = (str(REPO_ROOT / f"configs/toy/{name}.yaml") for name in ("dpo", "sft"))
    with pytest.raises(SystemExit) as exit_:
        _train_script().main(["--dry-run", "--config", dpo, "--config", sft])
    assert exit_.value.code == 2 and "--config given 2 times" in capsys.readouterr().err
    from t2i_align.config import load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.warns(UserWarning, match="config file .*empty.yaml is empty: it sets nothing"):
        load_config(empty)
    for rank, expected in (("1", 0), ("0", 1)):  # each of N processes warned: once, by rank 0
        monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _train_script().main(["--dry-run", "--config", str(empty), "model.pretrained=/nonexistent"])
        assert sum("is empty: it sets nothing" in str(w.message) for w in seen) == expected


def test_a_cache_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    """data.cache_dir naming a file (or a path under one) passed the dry run; the run failed after loading the
    model, as "File exists: PATH", naming no setting."""
    from helpers import write_rendered_pairs

    pairs = write_rendered_pairs(tmp_path / "pairs.parquet", n=2)
    (tmp_path / "afile").write_text("x")
    base = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), f"output_dir={tmp_path / 'run'}",
            f"data.path={pairs}", "train.batch_size=2", "data.cache=true"]
    for cache_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert _train_script().main([*base, f"data.cache_dir={cache_dir}"]) == 2
        assert capsys.readouterr().err.strip() == (f"error: data.cache_dir = {cache_dir}: {tmp_path / 'afile'} is a "
                                                   "file, not a folder; set data.cache_dir to a folder (made if "
                                                   "missing)")
    assert _train_script().main([*base, f"data.cache_dir={tmp_path / 'new' / 'cache'}"]) == 0  # made when it runs
    assert _train_script().main([*base[:-1], f"data.cache_dir={tmp_path / 'afile'}"]) == 0  # no cache: not read


def test_a_dry_run_prints_the_resolved_config_and_checks_the_data_without_loading(tmp_path, capsys, monkeypatch):
    import yaml

    import t2i_align.build as build
    from helpers import write_rendered_pairs

    monkeypatch.setattr(build, "load_components", _raise(AssertionError("loaded the model")))
    pairs = write_rendered_pairs(tmp_path / "pairs.parquet", n=16)
    base = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), f"output_dir={tmp_path / 'run'}"]
    assert _train_script().main([*base, f"data.path={pairs}", "train.max_steps=7"]) == 0
    out = capsys.readouterr()
    printed = yaml.safe_load(out.out)
    assert printed["train"]["max_steps"] == 7 and printed["data"]["path"] == str(pairs)
    assert printed["objective"]["name"] == "dpo" and "dry run:" in out.err
    assert not (tmp_path / "run").exists()  # writes nothing
    # overrides on both sides of an option (`accelerate launch ... k=v --dry-run k=v`) were "unrecognized arguments"
    assert _train_script().main(["train.max_steps=5", *base, f"data.path={pairs}", "train.batch_size=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 5 and printed["train"]["batch_size"] == 2
    assert _train_script().main([*base, f"data.path={tmp_path / 'none.parquet'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.parquet does not exist" in err
    assert _train_script().main([*base, f"data.path={pairs}", "model.family=sdxl"]) == 2  # the toy folder is SD1.5
    assert "model.family=sdxl but" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", f"model.pretrained={tmp_path}"]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", "model.variant=fp16"]) == 2  # passed, then failed
    assert "holds no fp16 weights" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", f"model.vae={tmp_path / 'no-vae'}"]) == 2  # passed
    assert "model.vae=" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", f"train.resume={tmp_path / 'nope'}"]) == 2  # passed
    assert "nope' does not exist; use train.resume=latest" in capsys.readouterr().err
    step = tmp_path / "old" / "checkpoints" / "step-10"  # passed, then failed when the run started
    step.mkdir(parents=True)
    (step / "t2i_align_checkpoint.json").write_text(json.dumps({"step": 10, "engine": "plain", "optimizer": "adamw"}))
    assert _train_script().main([*base, f"data.path={pairs}", f"train.resume={step}", "train.max_steps=7"]) == 2
    assert "is at step 10, past train.max_steps=7" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", f"train.resume={step}", "train.max_steps=20",
                                 "train.optimizer=adafactor"]) == 2
    assert "holds the state of train.optimizer=adamw" in capsys.readouterr().err
    assert _train_script().main([*base, f"data.path={pairs}", f"train.resume={step}", "train.max_steps=20"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():  # fp16 on a CPU passed the dry run and stopped the run at its start
        assert _train_script().main([*base, f"data.path={pairs}", "train.mixed_precision=fp16"]) == 0
        assert "note: train.mixed_precision=fp16 needs a GPU, which this machine lacks" in capsys.readouterr().err
    # data of the other kind passed the dry run and stopped the run at its start
    pq.write_table(pa.table({"caption": ["a cat"], "jpg": [b"x"]}), tmp_path / "captions.parquet")
    assert _train_script().main([*base, f"data.path={tmp_path / 'captions.parquet'}"]) == 2
    assert "captions.parquet lacks column(s) ['jpg_0', 'jpg_1', 'label_0']" in capsys.readouterr().err
    stage1 = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/longalign_stage1.yaml"), f"data.path={pairs}",
              f"output_dir={tmp_path / 'run'}"]
    assert _train_script().main(stage1) == 2
    assert "pairs.parquet is not image-caption data" in capsys.readouterr().err


def test_a_validation_reward_that_cannot_read_the_prompts_stops_the_run_before_training(tmp_path):
    """Used to fail with `not a toy short caption` in the final gallery, after the whole run."""
    from helpers import loop_cfg, write_rendered_pairs

    from t2i_align.config import ConfigError
    from t2i_align.loop import train

    model = save_tiny_pipeline("sd15", tmp_path / "pipe")
    data = write_rendered_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="tracking.validation_reward = 'toy-judge' cannot score"):
        train(loop_cfg(model, data, out, "lora.enabled=true", "train.max_steps=2",
                       "tracking.validation_reward=toy-judge", "tracking.validation_prompts=[a photo of a cat]"))
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_toy_cli_with_a_missing_model_folder_prints_one_error_line(tmp_path, capsys):
    from t2i_align.toy.__main__ import main

    code = main(["evaluate", "--model", str(tmp_path / "nowhere"), "--seeds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def _bad_inputs(tmp_path):
    """(overrides, message) of mistakes that used to end in a traceback (found by a CLI audit, session 13)."""
    from helpers import write_rendered_pairs

    not_parquet = tmp_path / "pairs.yaml"
    not_parquet.write_text("a: 1\n")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    two_pairs = write_rendered_pairs(tmp_path / "two.parquet", n=2)
    return [([f"data.path={not_parquet}"], "pairs.yaml is not a readable parquet file"),
            ([f"data.path={two_pairs}", f"output_dir={a_file}"], "output_dir .*taken is a file"),
            ([f"data.path={two_pairs}", f"model.pretrained={broken}"], "model_index.json is not valid JSON"),
            ([f"data.path={two_pairs}", "train.batch_size=16"], "2 usable pairs are too few for batch_size=16")]


def test_train_script_mistakes_found_by_the_cli_audit_print_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    for overrides, message in _bad_inputs(tmp_path):
        code = _train_script().main(["--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), "tracking.wandb=off",
                                     f"output_dir={tmp_path / 'run'}", *overrides])
        err = capsys.readouterr().err  # model loading's progress bars come first
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and "Traceback" not in err, (overrides, err[-1500:])
        assert re.search(message, last), (message, last)


def test_prompts_that_are_not_utf8_and_a_lora_that_is_not_safetensors_are_user_errors(tmp_path):
    from reward_models.cli import UsageError, folder_items
    from t2i_align.config import ConfigError
    from t2i_align.models import ModelLoadError
    from t2i_align.prompts import read_prompts
    from t2i_align.sampling import load_pipeline

    latin = tmp_path / "prompts.txt"
    latin.write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"prompts.txt is not UTF-8 text \(byte 5\)"):
        read_prompts(str(latin), "--prompts")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        folder_items(tmp_path, latin)
    junk = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"not a safetensors file")
    for given in (junk, junk.parent):  # said "do not match the model" until session 17
        with pytest.raises(ModelLoadError, match="pytorch_lora_weights.safetensors are not a safetensors file"):
            load_pipeline("toy", lora=str(given))


def test_toy_pairs_refuses_a_negative_prompt_count(tmp_path, capsys):
    """--num-prompts -1 silently meant "all but the last" (a slice)."""
    from t2i_align.toy.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["pairs", "--out", str(tmp_path / "p"), "--num-prompts", "-1"])
    assert info.value.code == 2 and "-1 is negative" in capsys.readouterr().err


def test_a_comparison_with_fewer_than_two_scored_pairs_is_a_user_error():
    """It ended in a ValueError traceback after all the sampling (e.g. one prompt at one seed)."""
    from t2i_align.evaluation import compare_scores

    with pytest.raises(UserError, match="only 1 of 2 image pairs have finite scores.*toy-judge reads only"):
        compare_scores([0.5, float("nan")], [0.6, 0.7])
    assert compare_scores([0.5, 0.4], [0.6, 0.7])["paired_diff"]["mean_diff"] == pytest.approx(0.2)


def test_a_shots_file_that_is_not_a_users_json_names_the_file(tmp_path):
    """A JSON list ended in "list indices must be integers"; invalid JSON in an error naming no file."""
    from t2i_align.users.embed import load_shots

    for text in ("[1, 2]", "{not json"):
        (tmp_path / "users.json").write_text(text)
        with pytest.raises(UserError, match="users.json is not a users.json written by"):
            load_shots(tmp_path / "users.json")


@pytest.mark.parametrize("users, why", [
    ({"users": [1]}, 'no "users" object'), ({"users": {"7": {"text": ""}}}, 'user 7 has no "shots" list'),
    ({"users": {"7": {"shots": 5}}}, 'user 7 has no "shots" list'),
    ({"users": {"7": {"shots": "abc"}}}, 'user 7 has no "shots" list'),  # passed, as the set of its letters
    ({"users": {"7": {"shots": [{"a": 1}]}}}, 'user 7 has no "shots" list of fingerprint strings'),
    ({"users": {"abc": {"shots": []}}}, "user key 'abc' is not an int or a quoted text id"),
    ({"shot_fingerprints": {}}, "a toy PPD set's users.json")])
def test_check_shots_on_a_malformed_users_json_names_the_file_and_its_shape(tmp_path, capsys, users, why):
    """Shots that were a number or held dicts ended in a TypeError traceback, a missing field in KeyError('shots')."""
    from t2i_align.users.__main__ import main as users_main

    path = tmp_path / "users.json"
    path.write_text(json.dumps(users))
    assert users_main(["check-shots", "--shots", str(path), "--pairs", str(tmp_path / "pairs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a users.json written by") and why in err, err
    assert 'expected {"users": {"7": {"text": "...", "shots": ["<pair fingerprint>", ...]}' in err


def test_t2i_score_on_an_empty_folder_says_it_holds_nothing_to_score(tmp_path):
    """It said "no *.parquet files in folder", as if a parquet were expected."""
    from reward_models.cli import UsageError, open_source

    with pytest.raises(UsageError, match="holds no images .* no metadata.jsonl and no \\*.parquet"):
        open_source(tmp_path, None, pairwise=False)


def test_output_paths_that_cannot_be_written_fail_before_any_work(tmp_path):
    """files.check_output_path, which generate, gallery, compare, t2i-score, toy pairs and merge_lora call first: a
    file among the parents, a file where a folder goes (and the reverse), an output that is or holds an input
    (`generate --overwrite --out RUN/final --lora RUN/final` deleted the LoRA it sampled)."""
    from t2i_align.files import check_output_path

    (tmp_path / "afile").write_text("")
    (tmp_path / "run" / "final").mkdir(parents=True)
    lora = tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors"
    lora.write_text("")
    for path, folder, inputs, message in (
            (tmp_path / "afile" / "out", True, {}, r"afile is a file, not a folder; choose another --out"),
            (tmp_path / "afile", True, {}, r"afile is a file: give a folder path"),
            (tmp_path / "run", False, {}, r"run is a folder: give a file path"),
            (tmp_path / "run" / "final", True, {"--lora": lora}, r"final is or holds --lora .*would delete it"),
            (tmp_path / "run", True, {"--lora": tmp_path / "run" / "final"}, r"run is or holds --lora")):
        with pytest.raises(UserError, match=message):
            check_output_path(path, "--out", folder=folder, inputs=inputs)
    check_output_path(tmp_path / "new" / "out", "--out", folder=True, inputs={"--lora": lora})  # fine


def test_generate_refuses_an_out_that_holds_its_lora_before_sampling(tmp_path, capsys):
    from test_sample_scripts import _script

    module = _script("generate")
    final = tmp_path / "final"
    final.mkdir()
    (final / "pytorch_lora_weights.safetensors").write_text("not read: refused first")
    code = run_cli(lambda: module.main(["--lora", str(final), "--out", str(final), "--overwrite"]))
    assert code == 2 and "is or holds --lora" in capsys.readouterr().err
    assert (final / "pytorch_lora_weights.safetensors").read_text() == "not read: refused first"


def test_a_lora_folder_without_weights_says_so(tmp_path):
    """It was reported as weights that "do not match the model", with diffusers' OSError about a .bin file."""
    from t2i_align.models import ModelLoadError
    from t2i_align.sampling import load_pipeline

    (tmp_path / "wronglora").mkdir()
    (tmp_path / "wronglora" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no LoRA weights in .*wronglora: it holds no pytorch_lora_weights"):
        load_pipeline("toy", lora=tmp_path / "wronglora")
    (tmp_path / "wronglora" / "model_index.json").write_text("{}")  # a full fine-tune's final/: told to give --model
    with pytest.raises(ModelLoadError, match=r"wronglora is a whole pipeline .* give it as --model, without --lora"):
        load_pipeline("toy", lora=tmp_path / "wronglora")


@pytest.mark.parametrize("script", ["compare", "gallery"])
def test_sample_scripts_refuse_prompts_the_reward_cannot_read_before_sampling(script, tmp_path, capsys, monkeypatch):
    """toy-judge (compare's default reward, gallery's when asked) on non-toy prompts ended in a traceback after all
    the sampling."""
    import t2i_align.evaluation as evaluation
    from test_sample_scripts import _script

    module = _script(script)
    monkeypatch.setattr(evaluation, "sample_model", _raise(AssertionError("sampled before checking")))
    (tmp_path / "p.txt").write_text("a cat on a sofa\n")
    code = run_cli(lambda: module.main(["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                                        "--reward", "toy-judge"]))
    assert code == 2 and "toy-judge scores only toy captions" in capsys.readouterr().err


def test_compare_refuses_a_user_when_neither_model_has_a_user_branch(tmp_path, capsys):
    """--user was silently ignored: both sides sampled without a user."""
    from test_sample_scripts import _script

    code = run_cli(lambda: _script("compare").main(["--user", "3"]))
    assert code == 2 and "--user: no model here has a PPD user branch" in capsys.readouterr().err


def test_folders_where_files_go_are_named_as_folders(tmp_path):
    """A folder given as --prompts or --config was reported as "not found"; a text file as --images got pyarrow's
    "Parquet file size is 3 bytes"."""
    from reward_models.cli import UsageError, folder_items, open_source
    from t2i_align.config import ConfigError, load_config
    from t2i_align.prompts import read_prompts

    with pytest.raises(ConfigError, match="--prompts: .* is a folder; give a text file"):
        read_prompts(str(tmp_path), "--prompts")
    with pytest.raises(ConfigError, match="is a folder: give a YAML file"):
        load_config(tmp_path)
    with pytest.raises(UsageError, match="--prompts .* is a folder: give a .jsonl"):
        folder_items(tmp_path, tmp_path)
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(UsageError, match="a.txt is neither a folder nor a .parquet file"):
        open_source(tmp_path / "a.txt", None, pairwise=False)


def test_toy_build_keeps_folders_that_are_not_toy_assets(tmp_path, capsys, monkeypatch):
    """`toy build --out runs` replaced the whole runs/ folder; `--tiny` without --out the shipped assets."""
    import hashlib
    import json

    import t2i_align.toy.build as build
    from t2i_align.toy.__main__ import main

    monkeypatch.setattr(build, "build", lambda *a, **k: pytest.fail("built after all"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_text("user data")
    for args, message in ((["--out", str(tmp_path / "runs")], "holds files that are not toy assets"),
                          (["--tiny"], "--tiny builds test-quality models: give --out"),
                          (["--only", "denoiser", "--out", str(tmp_path / "new")], "holds none: give --out")):
        assert main(["build", *args]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "runs" / "mine.txt").read_text() == "user data"
    # a folder with a manifest was taken as toy assets whatever else it held; --only kept damaged models
    earlier = tmp_path / "earlier"
    for name in ("pipeline/unet/model.bin", "toy_clip/model.bin"):
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_bytes(b"weights")
    (earlier / "manifest.json").write_text(json.dumps({"files": {
        "pipeline/unet/model.bin": "0" * 64, "toy_clip/model.bin": "0" * 64}}))
    (earlier / "notes.txt").write_text("user data")
    assert main(["build", "--out", str(earlier)]) == 2
    assert "holds files that are not toy assets (notes.txt)" in capsys.readouterr().err
    (earlier / "notes.txt").unlink()
    assert main(["build", "--only", "denoiser", "--out", str(earlier)]) == 2
    err = capsys.readouterr().err  # the UNet it rebuilds may be damaged; the toy CLIP it keeps may not
    assert "are damaged (hash mismatch: toy_clip/model.bin). Rebuild them with `python -m t2i_align.toy " \
           f"build --out {earlier}`" in err and "pipeline/unet" not in err
    built = []
    monkeypatch.setattr(build, "build", lambda *a, **k: built.append(k["only"]) or earlier)
    assert main(["build", "--only", "denscore", "--out", str(earlier)]) == 2  # keeps the toy CLIP too
    (earlier / "manifest.json").write_text(json.dumps({"files": {
        "pipeline/unet/model.bin": "0" * 64, "toy_clip/model.bin": hashlib.sha256(b"weights").hexdigest()}}))
    assert main(["build", "--only", "denoiser", "--out", str(earlier)]) == 0 and built == ["denoiser"]
    assert main(["build", "--only", "denscore", "--out", str(earlier)]) == 2  # keeps pipeline/, UNet included
    capsys.readouterr()
    (earlier / "manifest.json").write_text('{"files": ')  # torn
    assert main(["build", "--out", str(earlier)]) == 2
    assert "is not a readable toy-asset manifest" in capsys.readouterr().err


def test_reward_options_of_the_wrong_type_are_refused_when_the_reward_is_built():
    """`--option toy-clip.batch_size=8x` scored nothing (each batch's ValueError taken for a rejected prompt) and
    exited 0; batch_size=0 silently became 1."""
    from reward_models import get_reward
    from reward_models.base import RewardSetupError

    for value, message in (("8x", r"batch_size='8x': expected a int \(default 64\)"),
                           (0, "batch_size=0: give a number >= 1"), (True, "expected a int"),
                           (None, "batch_size=none: it takes a value \\(default 64\\)")):
        with pytest.raises(RewardSetupError, match=message):
            get_reward("toy-clip", batch_size=value)
    for value in (float("nan"), float("inf")):  # nan flagged every image as not finite; none was a TypeError
        with pytest.raises(RewardSetupError, match=f"scale={value}: expected a finite number"):
            get_reward("toy-clip", scale=value)
    with pytest.raises(RewardSetupError, match="scale=none: it takes a value"):
        get_reward("toy-clip", scale=None)
    assert get_reward("toy-clip", batch_size=8).encoder.batch_size == 8  # a valid value reaches the encoder


def test_outputs_that_would_replace_earlier_work_or_an_input_are_refused(tmp_path, capsys):
    """gallery --out RUN replaced the training run's gallery/; toy pairs / captions replaced an earlier data set;
    t2i-score --out metadata.jsonl overwrote the prompts it read."""
    from reward_models.cli import main as score
    from test_sample_scripts import _script
    from t2i_align.toy.__main__ import main as toy

    (tmp_path / "run" / "gallery").mkdir(parents=True)
    (tmp_path / "run" / "gallery" / "index.html").write_text("the training run's gallery")
    assert run_cli(lambda: _script("gallery").main(["--out", str(tmp_path / "run")])) == 2
    assert "gallery exists and --out" in capsys.readouterr().err
    (tmp_path / "run" / "pairs.parquet").write_text("earlier pairs")
    (tmp_path / "run" / "captions.parquet").write_text("earlier captions")
    for command in ("pairs", "captions"):
        assert toy([command, "--out", str(tmp_path / "run")]) == 2
        assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "run" / "metadata.jsonl").write_text('{"file": "a.png", "prompt": "p"}\n')
    assert score(["--reward", "toy-judge", "--images", str(tmp_path / "run"), "--out",
                  str(tmp_path / "run" / "metadata.jsonl")]) == 2
    assert "is or holds --prompts" in capsys.readouterr().err
    assert (tmp_path / "run" / "gallery" / "index.html").read_text() == "the training run's gallery"
    assert (tmp_path / "run" / "pairs.parquet").read_text() == "earlier pairs"
    (tmp_path / "compare.json").write_text("an earlier comparison")  # compare --out replaced it (session 17)
    assert run_cli(lambda: _script("compare").main(["--out", str(tmp_path / "compare.json")])) == 2
    assert "compare.json exists and --out" in capsys.readouterr().err
    assert (tmp_path / "compare.json").read_text() == "an earlier comparison"


@pytest.mark.parametrize("script", ["compare", "gallery"])
def test_sample_scripts_check_both_models_before_sampling_either(script, tmp_path, capsys, monkeypatch):
    """A typo in the tuned side's --lora, or a text encoding its record contradicts, was found after the base
    had been sampled; gallery ignored --text-encoding."""
    import t2i_align.evaluation as evaluation
    from test_sample_scripts import _script

    module = _script(script)
    monkeypatch.setattr(evaluation, "sample_model", _raise(AssertionError("sampled before checking")))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "t2i_align_text_encoding.json").write_text('{"kind": "segments"}')
    for args, message in ((["--lora", str(tmp_path / "typo")], "LoRA weights not found"),
                          (["--lora", str(tmp_path / "lora")], "no LoRA weights in"),
                          (["--base-text-encoding", "segments", "--no-base"] if script == "gallery"
                           else ["--alpha", "0.5"], "--base-text-encoding with --no-base" if script == "gallery"
                           else "compare runs one user at a time")):
        code = run_cli(lambda: module.main([*args, "--out", str(tmp_path / "o")]))
        assert code == 2 and message in capsys.readouterr().err, args


def test_data_and_reward_mistakes_stop_a_run_before_its_model_loads(tmp_path, monkeypatch):
    """They were found after load_components (a minute for SDXL, twice that with a frozen copy)."""
    import t2i_align.build as build
    import t2i_align.loop as loop
    from t2i_align.config import ConfigError, load_config
    from helpers import write_rendered_pairs

    monkeypatch.setattr(build, "load_components", _raise(AssertionError("loaded the model first")))
    pairs = write_rendered_pairs(tmp_path / "pairs.parquet", n=2)
    no_models = tmp_path / "no_models.parquet"
    pq.write_table(pq.read_table(pairs).drop(["model_0", "model_1"]), no_models)
    no_users = tmp_path / "no_users.parquet"
    pq.write_table(pq.read_table(pairs).drop(["user_id"]), no_users)
    raft = ["objective.name=sft", "raft.enabled=true", "raft.prompts=toy:train"]
    for overrides, error, message in (
            ([f"data.path={tmp_path / 'nope.parquet'}"], FileNotFoundError, "nope.parquet does not exist"),
            ([f"data.path={pairs}", "tracking.validation_reward=pickscor"], ConfigError,
             "tracking.validation_reward: unknown reward 'pickscor'"),
            ([*raft, "raft.reward=toy-clip", "raft.reward_options.batch_size=0"], ConfigError,
             "raft.reward: reward 'toy-clip' option batch_size=0"),
            (["objective.name=reward_backprop", "data.kind=prompts", "data.path=toy:train",
              "reward_backprop.reward_options.scal=2"], ConfigError, r"has no option\(s\) \['scal'\]"),
            ([f"data.path={no_models}", "data.both_models_contain=dream"], ConfigError, "model_0 and model_1 .* lacks"),
            ([*raft, "data.both_models_contain=dream"], ConfigError, "this run reads none"),
            ([f"data.path={pairs}", "tracking.validation_reward=pickscore"], ConfigError,
             "tracking.validation_reward: reward 'pickscore': no model_dir was given"),
            ([f"data.path={pairs}", "tracking.validation_reward=toy-clip",  # it failed after the model loaded
              "tracking.validation_reward_options.device=cuda:9"], ConfigError,
             r"tracking.validation_reward_options.device: device 'cuda:9': this machine has \d+ CUDA GPU"),
            (["objective.name=dpo", "raft.enabled=true", "raft.prompts=toy:train", "raft.k=1"], ConfigError,
             "raft.k = 1: online DPO"),
            ([*raft, "raft.min_gap=0.1"], ConfigError, "raft.min_gap = 0.1: only online DPO"),
            ([*raft, "raft.reward=decomposed-clip", "raft.reward_options.checkpoint=toy"], ConfigError,
             "decomposed-clip needs its common direction: set raft.reward_options.fit_prompts=toy:train"),
            ([*raft, "raft.reward=decomposed-clip", "raft.reward_options.checkpoint=toy",
              "raft.reward_options.direction=batch"], ConfigError, "direction=batch: each image .* the batching"),
            ([*raft, "raft.reward=decomposed-clip", "raft.reward_options.checkpoint=toy",
              "raft.reward_options.direction=d.safetensors", "raft.reward_options.fit_prompts=toy:train"],
             ConfigError, "give direction or fit_prompts, not both"),
            (["objective.name=sft", "raft.enabled=true", f"raft.prompts={tmp_path / 'none.txt'}"], ConfigError,
             "none.txt not found"),
            ([f"data.path={pairs}", "ppd.enabled=true", f"ppd.table={tmp_path / 'users.safetensors'}"],
             FileNotFoundError, "no user table at .*: set ppd.table to the"),  # it offered --user-table too
            (["objective.name=reward_backprop", "data.kind=prompts", "data.path=toy:train",
              "reward_backprop.reward=toy-judge"], ConfigError, "'toy-judge' is not a differentiable reward"),
            ([f"data.path={no_users}", "ppd.enabled=true", f"ppd.table={tmp_path / 'u.safetensors'}"], ConfigError,
             "has no user_id column"),
            (["objective.name=sft", "data.kind=captions", f"data.path={tmp_path / 'captions'}"], ConfigError,
             "data.path: .*captions does not exist"),
            (["objective.name=reward_backprop", "data.kind=prompts", f"data.path={tmp_path / 'p.txt'}"], ConfigError,
             "p.txt not found"),
            *([([f"data.path={pairs}", "model.attention=xformers"], UserError, "xformers .* is not installed")]
              if importlib.util.find_spec("xformers") is None else [])):
        cfg = load_config(REPO_ROOT / "configs/toy/dpo.yaml",
                          ["tracking.wandb=off", f"output_dir={tmp_path / 'run'}", *overrides])
        with pytest.raises(error, match=message):
            loop.train(cfg)


def test_ctrl_c_says_where_to_resume(tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt was a 100-line traceback; now one line with the newest checkpoint, and the process dies
    by SIGINT (it returned 130, and a shell loop over runs went on to the next)."""
    import t2i_align.loop as loop
    from t2i_align.config import load_config

    script = _train_script()
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.checkpoint_every=5"])
    assert script.where_to_resume(cfg) == "No checkpoint was written (train.checkpoint_every=5): a rerun starts fresh."
    step = tmp_path / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "t2i_align_checkpoint.json").write_text('{"step": 10}')
    assert script.where_to_resume(cfg) == (f"The newest complete checkpoint is {step}: continue with "
                                           "train.resume=latest and this output_dir.")

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "train", interrupted)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # run_cli quiets the interrupt's traceback
    with pytest.raises(KeyboardInterrupt):  # re-raised: Python then ends by SIGINT
        script.main([f"output_dir={tmp_path}"])
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)  # what Python calls then: prints nothing (below)
    note, stopped = capsys.readouterr().err.split("\n", 1)  # no --config: a note on the defaults comes first
    assert note.startswith("note: no --config: the built-in defaults")
    assert stopped == f"\nstopped (Ctrl-C). The newest complete checkpoint is {step}: continue with " \
                      "train.resume=latest and this output_dir.\n"


def test_a_reader_that_goes_away_ends_a_command_quietly(monkeypatch):
    """`t2i-score ... | head`: a BrokenPipeError traceback; now exit 1 without one. A broken pipe that is not
    stdout's (a service's socket) still propagates: a bug to see in full."""
    import io
    import os

    def closed_pipe():
        raise BrokenPipeError
    with pytest.raises(BrokenPipeError):
        run_cli(closed_pipe)  # stdout (pytest's capture) flushes fine: not the reader going away

    class GoneReader(io.StringIO):
        def flush(self):
            raise BrokenPipeError

        def fileno(self):
            return 1
    monkeypatch.setattr("sys.stdout", GoneReader())
    swapped = []
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: swapped.append(fd2))  # no real descriptor to swap here
    assert run_cli(closed_pipe) == 1 and swapped == [1]



def test_messages_name_the_flag_or_setting_the_user_typed(tmp_path, capsys):
    """Sample scripts named model.pretrained (a training key) for --model; a LoRA file that is not safetensors read
    as "do not match the model"; output_dir under a file was a bare "Not a directory"; a reward's missing weights
    said checkpoint=PATH without the --option form t2i-score takes."""
    from types import SimpleNamespace

    from reward_models.cli import main as score
    from t2i_align.engines import check_shared_output
    from t2i_align.models import ModelLoadError
    from t2i_align.sampling import check_weights

    with pytest.raises(ModelLoadError, match=r"--model='/no/such': no such folder; .*: --model /path/to/folder"):
        check_weights("/no/such", key="--model")
    (tmp_path / "final").mkdir()  # a LoRA run's export given as the model
    (tmp_path / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a diffusers pipeline folder \(it holds LoRA weights: give it as "
                                             r"the LoRA, and the base model here\); .*: --base-model /path/to/folder"):
        check_weights(tmp_path / "final", key="--base-model")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ModelLoadError, match=r"notes.txt are not a safetensors file \(.*\): give "
                                             r"pytorch_lora_weights.safetensors"):
        check_weights("toy", tmp_path / "notes.txt")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=r"output_dir .*afile/run: .*afile is a file, not a folder; choose another"):
        check_shared_output(SimpleNamespace(num_processes=1), tmp_path / "afile" / "run")
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "prompts.txt").write_text("a\n")
    assert score(["--reward", "hpsv2", "--images", str(tmp_path / "img"), "--prompts", str(tmp_path / "prompts.txt"),
                  "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "(t2i-score takes an option KEY=VALUE as --option hpsv2.KEY=VALUE)" in capsys.readouterr().err


def test_a_prompts_file_saved_with_a_bom_reads_its_first_prompt_plainly(tmp_path):
    """Windows editors write a UTF-8 BOM: it stayed in the first prompt ('\\ufeffa red cube')."""
    from t2i_align.prompts import read_prompts

    (tmp_path / "p.txt").write_bytes("a red cube\nb blue ball\n".encode("utf-8-sig"))
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red cube", "b blue ball"]


def _unsampled(*args, **kwargs):
    raise AssertionError("sampled before checking")


def test_sample_scripts_refuse_a_seed_torch_cannot_take_before_sampling(tmp_path, capsys, monkeypatch):
    """--seed 18446744073709551615 ended in "Overflow when unpacking long long" after the model had loaded: image k
    of prompt i uses seed + 10000k + i, and torch's generators take -2**63 .. 2**64 - 1."""
    import t2i_align.evaluation as evaluation
    from test_sample_scripts import _script

    common = _script("common")
    common._check_seeds(2 ** 64 - 1 - 10_002, 2, 3)  # the largest seed of 3 prompts at 2 seeds each: 2**64 - 1
    common._check_seeds(-2 ** 63, 2, 3)
    capsys.readouterr()
    common._check_seeds(0, 2, 10_001)  # prompt 10000's image 0 shares prompt 0's image 1 seed: said
    assert "image k + 1 of prompt i and image k of prompt i + 10000 share a seed" in capsys.readouterr().err
    common._check_seeds(0, 1, 10_001)  # one image per prompt: no two share one
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    (tmp_path / "p.txt").write_text("a large red circle at the top left on a white background\n" * 3)
    for seed in ("18446744073709551615", str(2 ** 64 - 10_002), str(-2 ** 63 - 1)):
        code = run_cli(lambda: _script("generate").main(["--seed", seed, "--prompts", str(tmp_path / "p.txt"),
                                                         "--seeds-per-prompt", "2", "--out", str(tmp_path / "o")]))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert err == f"error: --seed {seed}: image k of prompt i uses seed + 10000·k + i, which must lie in " \
                      "[-9223372036854775808, 18446744073709551615]; give a --seed from -9223372036854775808 to " \
                      "18446744073709541613\n"


@pytest.mark.parametrize("script, none", [("compare", ""), ("gallery", ", or --reward '' for none")])
def test_prompts_the_reward_cannot_read_say_how_to_choose_another_reward(script, none, tmp_path, capsys,
                                                                        monkeypatch):
    """--reward toy-judge (compare's default) on a real prompt file said only "toy-judge scores only toy captions"
    (gallery.py's default is now no reward for such prompts: tests/test_sample_scripts.py)."""
    import t2i_align.evaluation as evaluation
    from test_sample_scripts import _script

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    (tmp_path / "p.txt").write_text("a cat on a sofa\n")
    code = run_cli(lambda: _script(script).main(["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                                                 "--reward", "toy-judge"]))
    err = capsys.readouterr().err.splitlines()[-1] + "\n"  # compare first notes that it compares toy with toy
    assert code == 2 and err.startswith("error: toy-judge scores only toy captions")
    assert err.endswith("'a cat on a sofa'. Choose a --reward that reads these prompts (e.g. clip, pickscore, hpsv2)"
                        f"{none}\n")


@pytest.mark.parametrize("flag", ["--prompts", "--user-table", "--user-shots"])
def test_generate_overwrite_refuses_an_out_that_holds_an_input_file(flag, tmp_path, capsys, monkeypatch):
    """The guard covered only --model and --lora: `--overwrite --out DIR --prompts DIR/p.txt` deleted the prompts."""
    import t2i_align.evaluation as evaluation
    from test_sample_scripts import _script

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    given = tmp_path / "run" / "input.file"
    given.parent.mkdir()
    given.write_text("a large red circle at the top left on a white background\n")
    code = run_cli(lambda: _script("generate").main([flag, str(given), "--out", str(tmp_path / "run"), "--overwrite"]))
    assert code == 2 and f"--out {tmp_path / 'run'} is or holds {flag} {given}: writing there would delete it; " \
                          "choose another --out" in capsys.readouterr().err
    assert given.is_file()


def test_ctrl_c_in_a_command_is_one_line_and_the_process_dies_by_sigint():
    """A KeyboardInterrupt was a 35-frame traceback; an exit code 130 instead would let a shell loop go on."""
    import signal
    import subprocess

    code = "from t2i_align.errors import run_cli\ndef main():\n    raise KeyboardInterrupt\nrun_cli(main)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGINT and proc.stderr == "\nstopped (Ctrl-C)\n"


@pytest.mark.parametrize("echo_s, sigterm, returncode", [(5.0, False, -2), (5.0, True, -2), (0.0, False, -15)])
def test_a_launchers_echo_of_ctrl_c_does_not_cut_the_clean_up_short(echo_s, sigterm, returncode):
    """Under a one-process `accelerate launch`, Ctrl-C reaches train.py, then the launcher's SIGTERM a moment
    later: it killed the process before it said where to resume (torchrun's agent sends SIGINT again). An echo is
    ignored; a stop after STOP_ECHO_S (0 here) stops the process as before."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal, time
        import t2i_align.errors as errors
        errors.STOP_ECHO_S = {echo_s}
        def main():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                os.kill(os.getpid(), signal.SIGTERM)  # accelerate's echo
                os.kill(os.getpid(), signal.SIGINT)  # torchrun's
                time.sleep(0.2)  # the clean-up
                raise KeyboardInterrupt("continue with train.resume=latest")
        errors.run_cli(main, sigterm={sigterm})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == returncode, proc.stderr
    said = proc.stderr == "\nstopped (Ctrl-C). continue with train.resume=latest\n"
    assert said == (returncode == -2), proc.stderr


def test_a_kill_cleans_up_as_an_exception_does_but_not_in_training():
    """SIGTERM ended Python without its clean-up (a hidden staged folder stayed); train.py leaves the signal to the
    launcher, which stops every process together."""
    import signal

    from t2i_align.errors import run_cli

    seen = []
    assert run_cli(lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 0) == 0
    assert callable(seen[0]) and seen[0] is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    import subprocess  # training: a lone kill ends it at once, without clean-up, as SIGTERM's default does
    code = ("import os, signal, time\nfrom t2i_align.errors import run_cli\ndef main():\n    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(5)\n    finally:\n"
            "        print('cleaned up')\nrun_cli(main, sigterm=TERM)\n")
    for sigterm, returncode, out in ((False, -signal.SIGTERM, ""), (True, 143, "cleaned up\n")):
        proc = subprocess.run([sys.executable, "-c", code.replace("=TERM", f"={sigterm}")],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        assert (proc.returncode, proc.stdout) == (returncode, out), proc.stderr


def test_w_and_b_refusing_the_key_or_unreachable_is_one_line(tmp_path, monkeypatch):
    import wandb

    from t2i_align.errors import UserError
    from t2i_align.tracking import Tracker

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # past the check for a key (test_files)
    for error, told in ((wandb.errors.AuthenticationError("401 Unauthorized"), "W&B refused the API key"),
                        (wandb.errors.CommError("Timed out: no such host"), "W&B could not reach its server"),
                        (wandb.errors.UsageError("No API key configured"), "W&B did not start .No API key")):
        monkeypatch.setattr(wandb, "init", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        with pytest.raises(UserError, match=told):
            Tracker(tmp_path, wandb_mode="online")
    # gallery.py starts W&B before sampling: its refusal left an empty --out behind
    from test_sample_scripts import _script

    out = tmp_path / "gallery-out"
    code = _script("common").run_cli(lambda: _script("gallery").main(
        ["--out", str(out), "--wandb", "online", "--steps", "2", "--max-prompts", "1"]))
    assert code == 2 and not out.exists()


def test_w_and_b_auto_unreachable_logs_offline(tmp_path, monkeypatch, capsys):
    """tracking.wandb=auto went online for an API key and, with no server, stopped the run with an error (offline
    was as good a choice). An explicit online (setting or WANDB_MODE) and a refused key still stop it."""
    import wandb

    from t2i_align.errors import UserError
    from t2i_align.tracking import Tracker

    modes = []

    def init(*a, mode, error=wandb.errors.CommError("Timed out"), **k):
        modes.append(mode)
        if mode == "online":
            raise error
        return "offline run"
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert Tracker(tmp_path, wandb_mode="auto")._wandb == "offline run" and modes == ["online", "offline"]
    assert "W&B could not reach its server (Timed out); tracking.wandb=auto logs offline" in capsys.readouterr().err
    monkeypatch.setattr(wandb, "init", lambda *a, mode, **k: (_ for _ in ()).throw(
        wandb.errors.CommError("Timed out") if mode == "online" else wandb.errors.UsageError("no service")))
    with pytest.raises(UserError, match=r"W&B did not start \(no service\)"):  # offline failing too: one line
        Tracker(tmp_path, wandb_mode="auto")
    monkeypatch.setattr(wandb, "init", init)
    for asked, env in (("online", ""), ("auto", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        with pytest.raises(UserError, match="W&B could not reach its server"):
            Tracker(tmp_path, wandb_mode=asked)
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setattr(wandb, "init", partial(init, error=wandb.errors.AuthenticationError("401")))
    with pytest.raises(UserError, match="W&B refused the API key"):
        Tracker(tmp_path, wandb_mode="auto")


def test_w_and_b_failing_mid_run_leaves_the_run_going(tmp_path):
    """A W&B service lost hours into training raised out of Tracker.log and stopped the run."""
    import json
    import warnings

    import wandb

    from t2i_align.tracking import Tracker

    sent = []

    class Dying:
        def log(self, values, step):
            sent.append(step)
            raise wandb.errors.CommError("the service is gone")

        def finish(self):
            raise BrokenPipeError("gone")
    tracker = Tracker(tmp_path, wandb_mode="off")
    tracker._wandb = Dying()
    with pytest.warns(UserWarning, match="W&B stopped taking this run's logs .the service is gone.: the run goes on"):
        tracker.log({"loss": 1.0}, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        tracker.log({"loss": 0.5}, step=2)
        tracker.finish()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sent == [1] and logged == [1, 2]


def test_a_dry_run_refuses_a_tuned_folder_the_run_would_refuse(tmp_path, capsys):
    """check_tuned_folder ran only when the model loaded: the dry run passed a folder the run then refused."""
    import shutil

    from t2i_align.conditioning.text import write_text_encoding
    from t2i_align.toy.assets import pipeline_dir

    tuned = shutil.copytree(pipeline_dir(), tmp_path / "merged")
    write_text_encoding(tuned, "segments", 240)
    pq.write_table(pa.table({"caption": ["a cat"], "jpg": [b"x"]}), tmp_path / "captions.parquet")
    argv = ["--dry-run", "--config", str(REPO_ROOT / "configs/toy/longalign_stage1.yaml"), f"model.pretrained={tuned}",
            f"data.path={tmp_path / 'captions.parquet'}", f"output_dir={tmp_path / 'run'}"]
    assert _train_script().main([*argv, "model.text_encoding.kind=clip77"]) == 2
    assert "was tuned with text encoding 'segments'" in capsys.readouterr().err
    # stage 2 at another budget than its stage 1 was tuned at: its captions cut elsewhere, without a word
    assert _train_script().main([*argv, "model.text_encoding.token_budget=120"]) == 2
    assert "(token budget 240, in its" in capsys.readouterr().err
    assert _train_script().main(argv) == 0  # the stage-1 config encodes with segments, 240 tokens


def test_warnings_in_a_command_are_one_line_each_once():
    """A warning was `path.py:161: UserWarning: ...` and its source line, printed twice from two call sites."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import warnings
        from t2i_align.errors import run_cli

        def main():
            warnings.warn("the LoRA was trained on\\n another model")
            warnings.warn("the LoRA was trained on another model", stacklevel=2)
            return 0
        raise SystemExit(run_cli(main))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stderr == "warning: the LoRA was trained on another model\n", proc.stderr


@pytest.mark.parametrize("argv", [
    ["t2i-score", "--reward", "toy-judge", "--images", "", "--out", "OUT/s.jsonl"],
    ["t2i-score", "--reward", "toy-judge", "--images", "IMAGES", "--prompts", "", "--out", "OUT/s.jsonl"],
    ["t2i-score", "--reward", "toy-judge", "--images", "IMAGES", "--out", ""],
    ["data", "pairs", "--from", "LISTING", "--out", ""],
    ["data", "captions", "--from", "", "--out", "OUT"],
    ["data", "relabel", "--pairs", "", "--reward", "toy-judge", "--out", "OUT"],
    ["data", "relabel", "--pairs", "pairs.parquet", "--reward", "toy-judge", "--out", " "],
    ["toy", "pairs", "--out", ""],
])
def test_an_empty_path_flag_is_refused_not_taken_as_the_working_directory(argv, tmp_path, capsys, monkeypatch):
    """Path("") is ".": `--images ""` scored the working directory's images and `data pairs --out ""` wrote
    pairs.parquet into it, both exiting 0 (an unset shell variable does this); other messages showed it as `.`."""
    from reward_models.cli import main as score
    from t2i_align.data.__main__ import main as data
    from t2i_align.toy.__main__ import main as toy

    work = tmp_path / "work"
    (work / "IMAGES").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(work / "IMAGES" / "a.png")
    (work / "IMAGES" / "metadata.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "a"}) + "\n")
    Image.new("RGB", (8, 8)).save(work / "a.png")  # what the working directory would have given
    (work / "metadata.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "a"}) + "\n")
    (work / "LISTING").write_text(json.dumps({"caption": "a", "image_w": "a.png", "image_l": "a.png"}) + "\n")
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"x"]}), work / "pairs.parquet")
    monkeypatch.chdir(work)
    before = sorted(p.name for p in work.iterdir())
    command, *args = argv
    code = {"t2i-score": score, "data": data, "toy": toy}[command](args)
    flag = args[args.index("") - 1 if "" in args else args.index(" ") - 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {flag} is empty: give a path (an empty one would be taken as the working "
                                 "directory)"]
    assert sorted(p.name for p in work.iterdir()) == before


def test_generate_and_merge_refuse_an_empty_out(tmp_path, monkeypatch):
    """Their refusal named `--out .` as the current folder: the flag was empty."""
    import argparse

    from t2i_align.merge import merge_lora

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^--out is empty: give a path"):
        merge_lora("toy", tmp_path / "lora", "")
    monkeypatch.syspath_prepend(str(REPO_ROOT / "sample"))  # its `common`
    spec = importlib.util.spec_from_file_location("generate_script", REPO_ROOT / "sample" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    with pytest.raises(UserError, match="^--out is empty: give a path"):
        generate._check_out(argparse.Namespace(out=""))


def test_a_ctrl_c_and_its_echo_during_one_c_call_still_end_with_the_resume_line():
    """Both signals arriving while the main thread was in one C call (a checkpoint write): SIGTERM's handler was
    installed only by SIGINT's, which had not run yet, and the default action killed the process (1 of 6)."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import hashlib, os, signal, threading
        from t2i_align.errors import run_cli
        def main():
            pid = os.getpid()
            threading.Timer(0.1, lambda: (os.kill(pid, signal.SIGINT), os.kill(pid, signal.SIGTERM))).start()
            try:
                hashlib.pbkdf2_hmac("sha256", b"x", b"y", 3_000_000)  # one C call of about a second
            except KeyboardInterrupt:
                raise KeyboardInterrupt("continue with train.resume=latest")
        run_cli(main, sigterm=False)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == -2 and proc.stderr == "\nstopped (Ctrl-C). continue with train.resume=latest\n", \
        (proc.returncode, proc.stderr)


def test_a_config_mistake_is_said_once_per_machine_under_a_launch(capsys, monkeypatch):
    """Every process of `accelerate launch` read the config and printed the same `error:` line; now each
    machine's first process (LOCAL_RANK 0) prints it, and every process still exits with 2."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["--config", str(REPO_ROOT / "configs/toy/dpo.yaml"), "train.max_stepz=3"]
    for local_rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert _train_script().main(argv) == 2
        err = capsys.readouterr().err
        assert ("error: " in err and "max_stepz" in err) == said, (local_rank, err)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a mistake found later, maybe one process's own, is said by each
    assert run_cli(_raise(UserError("only this process's GPU is gone"))) == 2
    assert capsys.readouterr().err == "error: only this process's GPU is gone\n"
