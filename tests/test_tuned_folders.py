"""A folder this project exported trains as it samples (text encoding, PPD branch), and a failing export leaves
neither a half `final/` nor a hidden temporary folder."""
import shutil

import pytest

from t2i_align import models
from t2i_align.conditioning.text import write_text_encoding
from t2i_align.config import ModelConfig
from t2i_align.config.sections import TextEncodingConfig
from t2i_align.conditioning.users import USER_WEIGHT_NAME

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


def _copy(folder, tmp_path, name="tuned"):
    return shutil.copytree(folder, tmp_path / name)


def _config(folder, kind="clip77", budget=240):
    return ModelConfig(pretrained=str(folder), text_encoding=TextEncodingConfig(kind=kind, token_budget=budget))


def test_a_model_tuned_on_segments_does_not_train_on_77_tokens(sd15_dir, tmp_path):
    """A LongAlign stage-2 config without the segment setting silently cut every caption at 77 tokens."""
    tuned = _copy(sd15_dir, tmp_path)
    write_text_encoding(tuned, "segments", 120)
    with pytest.raises(models.ModelLoadError, match="model.text_encoding.kind=segments "
                                                    "model.text_encoding.token_budget=120"):
        models.load_components(_config(tuned))
    assert models.load_components(_config(tuned, "segments", 120)).text_encoding.kind == "segments"


def test_segments_on_a_clip77_tuned_model_is_allowed(sd15_dir, tmp_path):
    """From clip77 to segments is LongAlign's own step (a base model, or a DPO-tuned merge, trained on sentences)."""
    tuned = _copy(sd15_dir, tmp_path)
    write_text_encoding(tuned, "clip77", 240)
    assert models.load_components(_config(tuned, "segments")).text_encoding.kind == "segments"


def test_a_folder_with_a_ppd_user_branch_is_refused_for_training(sd15_dir, tmp_path):
    """Sampling attaches the branch beside unet/, training did not (and a PPD run replaced it with a fresh one)."""
    tuned = _copy(sd15_dir, tmp_path)
    (tuned / USER_WEIGHT_NAME).write_bytes(b"")
    with pytest.raises(models.ModelLoadError, match="holds a PPD user branch"):
        models.load_components(_config(tuned))


def test_a_failing_export_keeps_the_old_final_and_leaves_no_temporary_folder(sd15_dir, tmp_path, monkeypatch):
    from t2i_align import checkpoints

    comp = models.load_components(_config(sd15_dir))
    pipe = models.build_pipeline(comp)
    first = checkpoints.export_final(pipe, comp.unet, False, tmp_path, step=1)
    before = sorted(p.relative_to(first) for p in first.rglob("*"))

    def full_disk(pipeline, unet, folder, **_):
        (folder / "unet").mkdir()
        (folder / "unet" / "part.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_full_pipeline", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.export_final(pipe, comp.unet, False, tmp_path, step=2)
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before
    assert (first / checkpoints.FINAL_STEP_FILE).read_text() == '{"step": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_the_missing_safety_checker_warning_names_the_saved_folder_not_its_staged_copy(tmp_path, caplog):
    import json
    import logging

    from t2i_align.full_export import _carry_safety_checker

    source = tmp_path / "sd15"
    source.mkdir()
    (source / "model_index.json").write_text(json.dumps({"safety_checker": ["stable_diffusion", "X"]}))
    staged = tmp_path / "run" / ".final.tmp-abc123"
    staged.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        _carry_safety_checker(source, staged)
    assert f"the pipeline saved to {tmp_path / 'run' / 'final'} has none" in caplog.text


def test_the_model_a_lora_records_is_the_default_and_a_missing_one_is_named(tmp_path, capsys):
    """Without --model the sample scripts sampled the toy model under a real model's LoRA."""
    import json

    from t2i_align.base_model import BASE_MODEL_FILE, default_model

    lora = tmp_path / "final"
    lora.mkdir()
    assert default_model(None, None) == "toy" and default_model(None, lora) == "toy"  # no record
    assert default_model("given", lora) == "given"
    (tmp_path / "sd15").mkdir()
    (lora / BASE_MODEL_FILE).write_text(json.dumps({"pretrained": str(tmp_path / "sd15"), "given": "sd15"}))
    assert default_model(None, lora / "pytorch_lora_weights.safetensors") == str(tmp_path / "sd15")
    assert "--model not given" in capsys.readouterr().err
    (tmp_path / "sd15").rmdir()
    with pytest.raises(models.ModelLoadError, match="records it was trained on sd15, which is not here"):
        default_model(None, lora)
