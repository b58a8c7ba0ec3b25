"""Validation galleries: the base column is the original model, sampled where the pipeline runs; a validation
reward that cannot read the prompts stops the run at start-up (issue 10, bugs 4 and 8)."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align.config import ConfigError, load_config
from t2i_align.toy.scenes import short_caption, split_scenes
from t2i_align.adapters import visiting
from t2i_align.validation import Validator

TOY_CAPTION = short_caption(split_scenes()[0][0])
MAIN = SimpleNamespace(is_main_process=True, num_processes=1, device=torch.device("cpu"))


def _validator(*overrides, frozen=None, components=None, prompts=(), accelerator=MAIN):
    cfg = load_config(None, ["tracking.wandb=off", "tracking.validation_seeds=1", *overrides])
    return Validator(cfg, components, torch.nn.Linear(1, 1), frozen, accelerator, prompts)


# ---------------------------------------------------------------- bug 8: the reward must read the prompts
def test_toy_judge_on_prompts_it_cannot_read_is_a_config_error_at_construction():
    with pytest.raises(ConfigError) as info:
        _validator("lora.enabled=true", "tracking.validation_reward=toy-judge",
                   "tracking.validation_prompts=[a photo of a cat]")
    message = str(info.value)
    assert message.startswith("tracking.validation_reward = 'toy-judge' cannot score the validation prompts, "
                              "tracking.validation_prompts")
    assert "'a photo of a cat'" in message and "1 of 1 prompts" in message


def test_prompts_taken_from_the_data_are_named_as_such():
    with pytest.raises(ConfigError, match=r"the first training captions .*2 of 3 prompts"):
        _validator("lora.enabled=true", "tracking.validation_reward=toy-judge",
                   prompts=["my own caption", TOY_CAPTION, "another"])


def test_toy_captions_pass_the_check():
    validator = _validator("lora.enabled=true", "tracking.validation_reward=toy-judge", prompts=[TOY_CAPTION])
    assert validator.reward.name == "toy-judge" and validator.prompts == [TOY_CAPTION]


def test_an_unknown_validation_reward_is_a_user_error():
    from t2i_align.errors import UserError

    with pytest.raises(UserError, match="unknown reward 'toy-jduge'; available: .*toy-judge"):
        _validator("lora.enabled=true", "tracking.validation_reward=toy-jduge", prompts=[TOY_CAPTION])


def test_the_validation_reward_lives_on_the_main_process_and_its_device(monkeypatch):
    """Only the main process scores galleries: the others load no reward (a reward's default device, cuda, put one
    copy per process on GPU 0); the main process's setup error stops every process alike."""
    from reward_models import base

    from t2i_align.errors import UserError

    built = []

    class DeviceReward(base.Reward):
        name = "test-device-reward"

        def __init__(self, device="cuda", scale=1.0):
            built.append(device)
            self.scale = scale
    monkeypatch.setitem(base._REGISTRY, DeviceReward.name, DeviceReward)  # removed again after the test
    setting = "tracking.validation_reward=test-device-reward"
    assert isinstance(_validator("lora.enabled=true", setting, prompts=["p"]).reward, DeviceReward)
    assert built == ["cpu"]  # the accelerator's device, not the reward's default
    # tracking.validation_reward_options reach the reward (there were none: pickscore & co could not be shown)
    assert _validator("lora.enabled=true", setting, "tracking.validation_reward_options.scale=2.5",
                      prompts=["p"]).reward.scale == 2.5
    built.pop()
    other = SimpleNamespace(is_main_process=False, num_processes=2, device=torch.device("cpu"),
                            distributed_type="MULTI_CPU")
    sent = []
    told = (True, "tracking.validation_reward ...: from the main process")  # as the main process describes it
    monkeypatch.setattr("accelerate.utils.broadcast_object_list", lambda objs: sent.append(objs) or [told])
    with pytest.raises(UserError, match="^the main process could not load tracking.validation_reward: tracking"):
        _validator("lora.enabled=true", setting, prompts=["p"], accelerator=other)
    assert sent == [[None]] and built == ["cpu"]  # nothing built on the other process, nothing sent from it
    told = (False, "OutOfMemoryError: CUDA out of memory")  # not a user error: a traceback there too
    with pytest.raises(RuntimeError, match="could not load tracking.validation_reward: OutOfMemoryError"):
        _validator("lora.enabled=true", setting, prompts=["p"], accelerator=other)
    monkeypatch.setattr("accelerate.utils.broadcast_object_list", lambda objs: [None])
    assert _validator("lora.enabled=true", setting, prompts=["p"], accelerator=other).reward is None


# ---------------------------------------------------------------- bug 4: offloaded reference on the VAE's device
class OffloadedUnet(torch.nn.Module):
    """Stands in for the CPU-resident frozen reference; records where it is sent (no accelerator here)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.at, self.moves = torch.device("cpu"), []

    def to(self, device):
        self.at = torch.device(device)
        self.moves.append(self.at)
        return self


def test_offloaded_reference_samples_the_base_column_on_the_vae_device(monkeypatch):
    accelerator = torch.device("cuda", 0)
    frozen = OffloadedUnet()
    sampled_on = []
    monkeypatch.setattr(Validator, "_sample", lambda self, unet: sampled_on.append(getattr(unet, "at", None)))
    monkeypatch.setattr(Validator, "_rows", lambda self, policy: [])
    validator = _validator("train.offload_reference=true", frozen=frozen, prompts=[TOY_CAPTION],
                           components=SimpleNamespace(vae=SimpleNamespace(device=accelerator)))
    validator.rows(validator.sample())
    assert sampled_on == [accelerator, None]  # the base on the VAE's device; then the policy (never moved)
    assert frozen.moves == [accelerator, torch.device("cpu")] and frozen.at == torch.device("cpu")


def test_visiting_brings_the_module_home_after_an_error():
    frozen = OffloadedUnet()
    with pytest.raises(RuntimeError, match="out of memory"):
        with visiting(frozen, torch.device("cuda", 0)):
            raise RuntimeError("out of memory")
    assert frozen.at == torch.device("cpu")
    with visiting(frozen, torch.device("cpu")):  # already there: not moved at all
        pass
    assert frozen.moves == [torch.device("cuda", 0), torch.device("cpu")]


# ---------------------------------------------------------------- bug 4: "base" after a resume
def test_base_column_after_resuming_a_full_fine_tune_is_the_original_model(tmp_path, monkeypatch):
    from helpers import loop_cfg, write_rendered_pairs

    from t2i_align.loop import train

    bases = []
    original_sample = Validator.sample

    def recording_sample(self):
        result = original_sample(self)
        bases.append(self._base.images.clone())
        return result

    monkeypatch.setattr(Validator, "sample", recording_sample)
    model = save_tiny_pipeline("sd15", tmp_path / "pipe")
    data = write_rendered_pairs(tmp_path / "pairs.parquet")
    common = ("objective.name=sft", "train.checkpoint_every=2", "tracking.validation_prompts=[a cat]")
    train(loop_cfg(model, data, tmp_path / "run", *common, "train.max_steps=2"))
    train(loop_cfg(model, data, tmp_path / "run", *common, "train.max_steps=4", "train.resume=latest"))
    assert len(bases) == 2
    torch.testing.assert_close(bases[1], bases[0], rtol=0, atol=1e-6)  # both runs' base: the untrained UNet


@pytest.mark.parametrize("overrides, size", [(["data.resolution=48"], 48),
                                             (["raft.enabled=true", "raft.prompts=toy:train", "raft.resolution=24"],
                                              24)])
def test_the_gallery_samples_at_the_training_resolution(monkeypatch, overrides, size):
    """At data.resolution (RAFT: raft.resolution), not the UNet's default size: SD1.5 trained at 256 or SDXL at 512
    had galleries at 512 / 1024, sizes never trained."""
    import t2i_align.validation as validation

    seen = []
    monkeypatch.setattr(validation, "build_pipeline", lambda components, unet: SimpleNamespace(
        set_progress_bar_config=lambda **kw: None))
    monkeypatch.setattr(validation, "generate", lambda *a, **kw: seen.append((kw["height"], kw["width"])))
    monkeypatch.setattr(validation, "autocast", lambda accelerator: contextlib.nullcontext())
    accelerator = SimpleNamespace(**vars(MAIN), distributed_type="NO")
    _validator(*overrides, prompts=[TOY_CAPTION], accelerator=accelerator)._sample(torch.nn.Linear(1, 1))
    assert seen == [(size, size)] * 2  # a full fine-tune without a reference samples its base at construction
