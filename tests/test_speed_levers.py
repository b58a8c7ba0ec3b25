"""The speed settings (issue 14's levers): pinned SDPA kernels, fused AdamW, torch.compile through accelerate,
and the loop's sec_per_step. Their speed is measured in benchmarks/gpu_throughput.py; here only correctness."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import one_torch_thread, plain_lora_kwargs, save_tiny_pipeline  # noqa: F401 (autouse fixture)
from t2i_align import models
from t2i_align.attention import AttentionKernelError, PinnedSDPAProcessor
from t2i_align.config import ModelConfig, TrainConfig, load_config
from t2i_align.loop import train
from t2i_align.optim import make_optimizer
from helpers import loop_cfg, write_rendered_pairs


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


def _forward(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), h).sample


@pytest.mark.parametrize("kernel", ["sdpa-math", "sdpa-flash"])  # the two SDPA kernels a CPU has
def test_pinned_sdpa_kernel_gives_plain_sdpa_outputs(sd15_dir, kernel):
    plain = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    pinned = models.load_components(ModelConfig(pretrained=str(sd15_dir), attention=kernel))
    processors = pinned.unet.attn_processors.values()
    assert processors and all(isinstance(p, PinnedSDPAProcessor) and p.setting == kernel for p in processors)
    assert torch.allclose(_forward(pinned.unet), _forward(plain.unet), atol=1e-5)


def test_pinned_kernel_that_cannot_run_names_the_setting(sd15_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir), attention="sdpa-cudnn"))
    with pytest.raises(AttentionKernelError, match="model.attention=sdpa-cudnn.*use model.attention=sdpa"):
        _forward(comp.unet)


def test_fused_adamw_takes_the_same_step_as_adamw():
    torch.manual_seed(0)
    start, grad = torch.randn(5, 3), torch.randn(5, 3)
    results = {}
    for name in ("adamw", "adamw_fused"):
        param = torch.nn.Parameter(start.clone())
        opt = make_optimizer([param], TrainConfig(optimizer=name), lr=0.1)
        assert opt.defaults["fused"] is (True if name == "adamw_fused" else None)
        for _ in range(3):
            param.grad = grad.clone()
            opt.step()
        results[name] = param.detach()
    assert not torch.equal(results["adamw"], start)
    assert torch.allclose(results["adamw_fused"], results["adamw"], atol=1e-6)


def _cfg(model, data, out, *extra):
    """test_loop's tiny run, as LoRA DPO logged every step."""
    return loop_cfg(model, data, out, "lora.enabled=true", "lora.rank=4", "objective.beta=100", "train.log_every=1",
                    *extra)


def test_compiled_unet_exports_lora_under_its_own_names(sd15_dir, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend X` (the env var below) and train.compile both compile the prepared UNet;
    the LoRA export must not carry torch.compile's `_orig_mod.` prefix, or diffusers cannot load it."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")  # dynamo tracing without inductor's compile time
    pairs = write_rendered_pairs(tmp_path / "pairs.parquet")
    common = ("lora.init=default", "train.optimizer=adamw_fused", "train.checkpoint_every=1")
    train(_cfg(sd15_dir, pairs, tmp_path / "run", "train.max_steps=1", *common))
    result = train(_cfg(sd15_dir, pairs, tmp_path / "run", "train.max_steps=2", "train.resume=latest", *common))
    for file in (result.final / "pytorch_lora_weights.safetensors",
                 tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        assert keys and all(".lora_" in k and "_orig_mod" not in k for k in keys), file
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_dir))
    pipe.load_lora_weights(str(result.final), **plain_lora_kwargs())
    assert torch.allclose(_forward(pipe.unet), _forward(result.unet), atol=1e-6)
    assert not torch.allclose(_forward(pipe.unet), _forward(StableDiffusionPipeline.from_pretrained(
        str(sd15_dir)).unet), atol=1e-6)


def test_train_compile_asks_accelerate_for_inductor(sd15_dir, tmp_path, monkeypatch):
    import accelerate

    seen = {}

    class Stop(Exception):
        pass

    def fake_accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(accelerate, "Accelerator", fake_accelerator)
    for setting, backend in (("true", "inductor"), ("false", None)):
        with pytest.raises(Stop):
            train(_cfg(sd15_dir, tmp_path / "unused.parquet", tmp_path / "run", f"train.compile={setting}"))
        assert seen["dynamo_backend"] == backend


def test_sec_per_step_is_logged_per_step(sd15_dir, tmp_path, monkeypatch):
    from t2i_align import loop

    pairs = write_rendered_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    # a fake clock: read once at the start and once per log (a further read would raise StopIteration)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=iter([100.0, 103.0, 107.0]).__next__))
    train(_cfg(sd15_dir, pairs, out, "train.max_steps=4", "train.log_every=2"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["sec_per_step"] for r in records] == [1.5, 2.0]  # (103 - 100) / 2 steps, (107 - 103) / 2 steps


def test_speed_settings_are_read_and_checked():
    from t2i_align.config import ConfigError

    cfg = load_config(None, ["model.attention=sdpa-flash", "train.optimizer=adamw_fused", "train.compile=true"])
    assert (cfg.model.attention, cfg.train.optimizer, cfg.train.compile) == ("sdpa-flash", "adamw_fused", True)
    with pytest.raises(ConfigError, match=r"model\.attention = 'sdpa-fast'.*sdpa-efficient"):
        load_config(None, ["model.attention=sdpa-fast"])
    with pytest.raises(ConfigError, match=r"model\.attention = 'sdpa-math'.*sdpa or xformers with ppd\.enabled"):
        load_config(None, ["model.attention=sdpa-math", "ppd.enabled=true", "ppd.table=users.safetensors"])

