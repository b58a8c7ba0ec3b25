"""Settings refused by `t2i_align.build.check_before_loading`: by the dry run, and by a run before its model loads
(they were refused only once the model had loaded, or not at all)."""
import importlib.util
from pathlib import Path

import pytest

from helpers import one_torch_thread  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
LONGALIGN = ["--config", str(REPO_ROOT / "configs/toy/longalign_reward.yaml"), "model.pretrained=toy"]
GALLERY = ["tracking.validation_reward=decomposed-clip", "tracking.validation_reward_options.checkpoint=toy-denscore"]


def _dry_run(args, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "train" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--dry-run", *args, f"output_dir={tmp_path / 'run'}"])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    # reward_backprop scores each process's micro-batch: v of one prompt is its own t (build_reward refused it)
    (["train.batch_size=1", "reward_backprop.reward_options.direction=batch"],
     "reward_backprop.reward_options.direction=batch with train.batch_size=1: each process scores its micro-batch"),
    (["train.batch_size=2", "reward_backprop.reward_options.direction=batch"], None),
    # the gallery scores its prompts x seeds in one call: one prompt (the recipe's) was warned at the first gallery
    ([*GALLERY, "tracking.validation_reward_options.direction=batch"],
     "tracking.validation_reward_options.direction=batch with one tracking.validation_prompts prompt"),
    ([*GALLERY, "tracking.validation_reward_options.direction=batch", "tracking.validation_prompts=[a,b]"], None),
    # no direction: the reward refused to load, after the model had
    (GALLERY, "tracking.validation_reward=decomposed-clip needs its common direction"),
    ([*GALLERY, "tracking.validation_reward_options.omega=1.0"], None),
    # DDIM's set_timesteps failed after the scheduler loaded (the toy's has 1000 timesteps)
    (["reward_backprop.num_steps=5000"], "reward_backprop.num_steps=5000 is more DDIM steps than this model's "
     "schedule (1000 timesteps) can take: give fewer"),
    (["reward_backprop.num_steps=1000"], None),
])
def test_the_dry_run_refuses_what_only_the_loaded_model_refused(overrides, message, tmp_path, capsys):
    code, last = _dry_run([*LONGALIGN, *overrides], tmp_path, capsys)
    if message is None:
        assert code == 0 and last.startswith("dry run: the config"), last
    else:
        assert code == 2 and last.startswith(f"error: {message}"), last


@pytest.mark.parametrize("config, overrides, message", [
    ("longalign_reward", ["train.batch_size=1", "reward_backprop.reward_options.direction=batch"],
     "direction=batch with train.batch_size=1"),
    ("longalign_reward", GALLERY, "needs its common direction"),
    ("seppo", ["seppo.sample_steps=5000"], "seppo.sample_steps=5000 is more DDIM steps")])
def test_a_run_refuses_them_before_its_model_loads(config, overrides, message, tmp_path, monkeypatch):
    import t2i_align.build as build
    import t2i_align.loop as loop
    from t2i_align.config import ConfigError, load_config

    def loaded(*args, **kwargs):
        raise AssertionError("loaded the model first")
    monkeypatch.setattr(build, "load_components", loaded)
    if config == "seppo":  # its pair data, made here (the config's runs/ folder is not in a fresh clone)
        from helpers import write_rendered_pairs

        overrides = [*overrides, f"data.path={write_rendered_pairs(tmp_path / 'pairs.parquet')}"]
    cfg = load_config(REPO_ROOT / f"configs/toy/{config}.yaml",
                      ["model.pretrained=toy", "tracking.wandb=off", f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        loop.train(cfg)


def test_the_dry_run_offline_refuses_a_hub_id_not_in_the_cache(tmp_path, capsys, monkeypatch):
    """Under HF_HUB_OFFLINE the dry run passed a hub id it could not have (`a hub id, resolved when the run
    starts`), and the run failed seconds later; online it still passes one without downloading anything."""
    import t2i_align.model_folders as model_folders
    from helpers import write_rendered_pairs

    pairs = write_rendered_pairs(tmp_path / "pairs.parquet")
    args = ["--config", str(REPO_ROOT / "configs/sd15/dpo_lora.yaml"), "model.pretrained=t2i-align-tests/not-cached",
            f"data.path={pairs}", "train.mixed_precision=no", "model.weight_dtype=fp32"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, last = _dry_run(args, tmp_path, capsys)
    assert code == 2 and "not in the local cache and HF_HUB_OFFLINE is set" in last, last
    monkeypatch.setattr(model_folders, "_hub_offline", lambda: False)
    monkeypatch.setattr(model_folders, "_download", lambda *a: pytest.fail("the dry run downloaded"))
    code, last = _dry_run(args, tmp_path, capsys)
    assert code == 0 and "a hub id, fetched when the run starts" in last, last


def test_a_folder_saved_without_a_part_its_family_needs_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """An SDXL folder saved with text_encoder_2=None passed the dry run; the run failed after text_encoder loaded."""
    import json
    import shutil

    import t2i_align.models as models
    from t2i_align.config import ModelConfig
    from t2i_align.toy.assets import pipeline_dir

    from helpers import save_tiny_pipeline

    sdxl = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    monkeypatch.setattr(models, "_load_part", lambda *a, **k: pytest.fail("loaded a part first"))
    with pytest.raises(models.ModelLoadError, match=r"lists no text_encoder_2 \(null\), which the sdxl family needs"):
        models.load_components(ModelConfig(pretrained=str(sdxl)))
    monkeypatch.undo()
    toy = shutil.copytree(pipeline_dir(), tmp_path / "toy")
    index = json.loads((toy / "model_index.json").read_text())
    (toy / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
    config = [*LONGALIGN[:2], f"model.pretrained={toy}"]
    code, last = _dry_run(config, tmp_path, capsys)
    assert code == 2 and "lists no vae (absent), which the sd15 family needs" in last, last
    assert "model.vae=DIR" in last
    toy_vae = pipeline_dir() / "vae"  # another VAE given: the folder's own is not needed
    code, last = _dry_run([*config, f"model.vae={toy_vae}"], tmp_path, capsys)
    assert code == 0, last
