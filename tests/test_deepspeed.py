"""DeepSpeed ZeRO-2 on two CPU processes (DeepSpeed's CPU accelerator over gloo), launched with the shipped
configs/accelerate/deepspeed_zero2.yaml: the real engine steps, clips, saves and resumes. accelerate starts DeepSpeed
only where it finds GPUs; the training script lifts that one gate (multiprocess_train.allow_deepspeed_on_cpu)."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_fsdp import (assert_resumed_run_takes_the_ddp_steps, assert_same_gallery, assert_takes_the_ddp_steps,
                       metrics, relative_distance, tiny_run_args)
from test_multiprocess import ENV, SCRIPT, launch, run_launch

pytest.importorskip("deepspeed")  # the dev extra installs it

CONFIG = SCRIPT.parents[1] / "configs" / "accelerate" / "deepspeed_zero2.yaml"
DS_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
             "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
DS_ENV = {**{k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}, "DS_ACCELERATOR": "cpu",
          "T2I_TEST_DEEPSPEED_ON_CPU": "1"}


def launch_deepspeed(*overrides: str) -> None:
    run_launch([*DS_LAUNCH, *overrides], DS_ENV)


def test_deepspeed_installed_logs_to_stderr_not_to_a_commands_output():
    """Installed, DeepSpeed is imported by every run (accelerate's unwrap_model) and logged the accelerator it found
    to stdout, ahead of the toy demo's JSON there. After the loop's early import its log goes to stderr."""
    code = ("from t2i_align.engines import deepspeed_logs_to_stderr\n"
            "deepspeed_logs_to_stderr()\n"
            "from deepspeed.utils import logger\n"
            "logger.warning('a later DeepSpeed message')\n"
            "print('the output')\n")
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}  # DeepSpeed detects (and reports) the accelerator
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "the output\n"
    assert "a later DeepSpeed message" in done.stderr and "accelerator" in done.stderr


def test_deepspeed_lora_with_accumulation_resumed_takes_the_ddp_steps(tmp_path):
    """ZeRO-2 with LoRA and train.grad_accum=2, stopped after step 2 and resumed from the engine's checkpoint: the
    same losses and gradient norms as DDP, and the same adapter. Before the loop marked the last micro-batch
    (accelerator.sync_gradients), the engine stepped after every micro-batch: step 1 already differed."""
    args = tiny_run_args(tmp_path, "lora.enabled=true", "train.learning_rate=1e-2", "train.grad_accum=2")
    launch(*args, f"output_dir={tmp_path / 'ddp'}", "train.max_steps=3")
    assert_resumed_run_takes_the_ddp_steps(launch_deepspeed, args, tmp_path / "ds", tmp_path / "ddp")
    assert (tmp_path / "ds" / "checkpoints" / "step-2" / "pytorch_model").is_dir()  # the engine's own checkpoint


def test_deepspeed_full_finetune_clips_and_exports_as_ddp(tmp_path, ddp_full_run):
    """Full fine-tuning under ZeRO-2, gradient norms far above the clipping threshold (DeepSpeed clips at its
    gradient_clipping, which must equal train.max_grad_norm), under a warmed-up linear schedule (accelerate steps
    it, not the engine): the same steps, learning rates, export and gallery images as DDP."""
    args, ddp = ddp_full_run
    launch_deepspeed(*args, f"output_dir={tmp_path / 'ds'}")
    assert min(m["grad_norm"] for m in metrics(ddp)) > 10  # clipped to 1.0 in both
    assert_takes_the_ddp_steps(tmp_path / "ds", ddp)
    assert [m["lr"] for m in metrics(tmp_path / "ds")] == pytest.approx([0.0, 1e-3, 5e-4], abs=1e-12)  # each step's
    assert_same_gallery(tmp_path / "ds", ddp)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "ds" / "final" / weights), load_file(ddp / "final" / weights)
    assert relative_distance(a, b, load_file(ddp.parent / "sd15" / weights)) < 1e-2
    assert (tmp_path / "ds" / "gallery" / "index.html").is_file()


@pytest.mark.slow  # 36 s; as FSDP bf16
def test_deepspeed_bf16_differs_from_ddp_bf16_only_by_rounding(tmp_path):
    """bf16 under DeepSpeed: the engine holds the UNet in bf16 (fp32 master weights in its optimizer) and the loop
    autocasts the fp32 inputs to meet it (without, the first forward failed: "mat1 and mat2 must have the same
    dtype"). It must end within 1.5× of how far bf16 DDP ends from fp32 DDP; its export is the engine's
    bf16 weights, upcast to float32."""
    args = tiny_run_args(tmp_path, "lora.enabled=false", "train.learning_rate=1e-3", "train.max_steps=3",
                         "tracking.validate_every=2")
    launch_deepspeed(*args, "train.mixed_precision=bf16", f"output_dir={tmp_path / 'ds16'}")
    launch(*args, "train.mixed_precision=bf16", f"output_dir={tmp_path / 'ddp16'}")
    launch(*args, f"output_dir={tmp_path / 'ddp32'}")
    weights = "unet/diffusion_pytorch_model.safetensors"
    origin = load_file(tmp_path / "sd15" / weights)
    ds16, ddp16, ddp32 = (load_file(tmp_path / run / "final" / weights) for run in ("ds16", "ddp16", "ddp32"))
    # the engine's bf16 weights, written in float32 as every part of a full export (they load in plain diffusers)
    assert all(v.dtype == torch.float32 and torch.equal(v.bfloat16().float(), v) for v in ds16.values())
    assert relative_distance(ds16, ddp16, origin) < 1.5 * relative_distance(ddp16, ddp32, origin)
    assert (tmp_path / "ds16" / "gallery" / "index.html").is_file()


METHODS = {  # each method's own state under the engine: SePPO's snapshot pool, PPD's user branch, RAFT's gathered
    # pool, reward fine-tuning's gradient-carrying sampler with the KL anchor
    "seppo": ["lora.enabled=true", "objective.name=seppo", "seppo.snapshot_every=1", "seppo.pool_size=4",
              "seppo.sample_steps=2", "train.max_steps=3"],
    "ppd": ["ppd.enabled=true", "train.max_steps=3"],
    "raft": ["model.pretrained=toy", "lora.enabled=true", "objective.name=sft", "raft.enabled=true",
             "raft.prompts=toy:train", "raft.prompts_per_round=4", "raft.k=2", "raft.round_steps=1",
             "raft.sample_steps=2", "raft.top_fraction=0.5", "train.max_steps=2"],
    "reward": ["model.pretrained=toy", "lora.enabled=true", "lora.rank=2", "objective.name=reward_backprop",
               "data.kind=prompts", "data.path=toy:train-long", "data.resolution=32",
               "reward_backprop.reward=decomposed-clip", "reward_backprop.reward_options={checkpoint: toy, omega: 0.3}",
               "reward_backprop.num_steps=4", "reward_backprop.grad_mode=strided", "reward_backprop.grad_k=2",
               "reward_backprop.checkpoint=true", "reward_backprop.kl_weight=1", "train.max_steps=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_deepspeed_methods_take_the_ddp_steps(tmp_path, method):
    """SePPO, PPD, RAFT and reward fine-tuning under ZeRO-2: the same losses and gradient norms as DDP (slow: run
    with -m slow)."""
    from test_ppd_loop import write_table, write_user_pairs

    args = tiny_run_args(tmp_path, "train.learning_rate=1e-2", "train.checkpoint_every=0", *METHODS[method])
    if method == "ppd":
        data = write_user_pairs(tmp_path / "users.parquet", users=[1, 2, 3, 99])
        args += [f"data.path={data}", f"ppd.table={write_table(tmp_path / 'users.safetensors', [1, 2, 3])}"]
    launch_deepspeed(*args, f"output_dir={tmp_path / 'ds'}")
    launch(*args, f"output_dir={tmp_path / 'ddp'}")
    assert_takes_the_ddp_steps(tmp_path / "ds", tmp_path / "ddp")
