"""What the loop can run under each accelerate engine, checked at start before anything loads, and the settings
it gives the engines (`configure_engine`). Each refusal says what to use instead; each was found by running the
engine on CPU processes (tests/test_fsdp.py, tests/test_deepspeed.py) or by reading accelerate and DeepSpeed.

DeepSpeed steps its engine inside accelerate's backward, on the micro-batches accelerate marks as the last before a
step (`accelerator.sync_gradients`, set by the loop), and divides the loss by its own gradient_accumulation_steps,
where the loop already divides by train.grad_accum: so DeepSpeed's must stay 1. It also clips at its own
gradient_clipping, not train.max_grad_norm (`check_deepspeed`).
"""
from __future__ import annotations

import os

from .engines import is_fsdp, say
from .errors import UserError


ENGINES_TESTED_WITH = "1.15"
"""The accelerate release tests/test_fsdp.py and tests/test_deepspeed.py ran against."""


def check_launcher_precision(cfg) -> None:
    """Before the Accelerator: the run config's train.mixed_precision decides the precision (the config's checks
    read it: half-precision frozen parts, model.weight_dtype, need it to match), and accelerate silently prefers it
    to the launcher's (`accelerate launch --mixed_precision`, a launch file's or `accelerate config`'s
    mixed_precision). A launcher asking for another precision is refused rather than ignored; its "no" is also its
    default, so it passes."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked not in ("no", cfg.train.mixed_precision):
        raise UserError(f"accelerate launch asks for mixed precision {asked!r} (its --mixed_precision or its config "
                        f"file), but the run config says train.mixed_precision={cfg.train.mixed_precision!r}, which "
                        f"decides: set train.mixed_precision={asked}, or launch with --mixed_precision no")


def configure_engine(accelerator, cfg, objective_runs_sharded: bool) -> None:
    """At start, before loading anything: fail on what the loop cannot run under the launched engine, and give the
    engine the settings it takes from the run's config."""
    check_processes_joined(accelerator)
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu" \
            and accelerator.distributed_type != "DEEPSPEED":  # (under DeepSpeed the loop autocasts itself)
        raise UserError("train.mixed_precision=fp16 needs a GPU: on a CPU accelerate runs without fp16 autocast, so "
                        "fp16 frozen parts would meet the fp32 UNet at the first step. On a CPU use "
                        "train.mixed_precision=bf16 model.weight_dtype=bf16, or train.mixed_precision=no "
                        "model.weight_dtype=fp32")
    if accelerator.distributed_type in ("FSDP", "DEEPSPEED"):
        import accelerate
        from packaging.version import Version

        if Version(accelerate.__version__) < Version(ENGINES_TESTED_WITH):
            raise UserError(f"FSDP and DeepSpeed runs need accelerate >= {ENGINES_TESTED_WITH} (what they were tested "
                            f"with; older ones lack FSDP2 or DeepSpeed's per-micro-batch stepping), this is "
                            f"{accelerate.__version__}: pip install -U accelerate")
        if cfg.model.channels_last:
            engine = "FSDP" if is_fsdp(accelerator) else "DeepSpeed"
            raise UserError(f"model.channels_last is not supported under {engine}: it makes the "
                            "UNet's weights non-contiguous, which FSDP's sharding and DeepSpeed's weight broadcast "
                            "refuse (after the model and cache were built); leave it off")
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:  # ACCELERATE_GRADIENT_ACCUMULATION_STEPS: accelerate's backward would divide the loss again
        raise UserError(f"accelerate was given gradient accumulation over {steps} steps (its launch config or "
                        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS): the loop accumulates itself, and the loss would be "
                        f"divided twice. Unset it and set train.grad_accum={steps}")
    check_fsdp(accelerator, cfg, objective_runs_sharded)
    check_deepspeed(accelerator, cfg)


def check_processes_joined(accelerator) -> None:
    """Processes a launcher started (WORLD_SIZE) that accelerate did not join into one run would each train alone
    in the same output_dir (the others then found it "in use by another run": their own launch's). accelerate does
    this when a launch config asks for GPUs (distributed_type MULTI_GPU) on a machine without CUDA."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1 and accelerator.num_processes == 1:
        raise UserError(f"the launcher started {launched} processes, but accelerate made each one a run of its own "
                        f"({accelerator.distributed_type}, device {accelerator.device}): a launch config for GPUs on a "
                        "machine without CUDA does this. On CPUs launch with ACCELERATE_USE_CPU=1 accelerate launch "
                        "--multi_gpu --num_processes N ..., or start one process")


def check_fsdp(accelerator, cfg, objective_runs_sharded: bool) -> None:
    """Fail at start, before loading anything, on what the loop cannot run under FSDP, saying what to use instead:
    version 1; SePPO with LoRA (its snapshot references put adapter weights into the live UNet with torch.func,
    which FSDP's own gathering overrides; SePPO's full fine-tune loads snapshots into the unsharded frozen copy);
    torch.compile (found by running it: the loop's direct UNet calls miss the compiled root's gathering); RAFT /
    online DPO rounds whose prompts do not split evenly over the processes (each process must run as many
    forwards as the others); optimizers whose state is not sharded with the weights (Adafactor, 8-bit AdamW)."""
    if not is_fsdp(accelerator):
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise UserError(f"accelerate's FSDP version {version} is not supported: the loop samples and exports by "
                        "calling the UNet directly, which bypasses FSDP1's wrapper. Set fsdp_version: 2 in the "
                        "accelerate config (as configs/accelerate/fsdp.yaml does)")
    if not objective_runs_sharded:
        raise UserError(f"objective {cfg.objective.name!r} with adapters (LoRA or PPD's user branch) does not run "
                        "under FSDP (its adapter snapshots enter the live UNet, which FSDP shards). Use "
                        "configs/accelerate/ddp.yaml (adapters fit one GPU), or full fine-tuning (lora.enabled=false, "
                        "ppd.enabled=false), which runs sharded")
    if getattr(accelerator.state.dynamo_plugin, "backend", "NO") != "NO":  # DynamoBackend is a str enum
        raise UserError("torch.compile (train.compile or accelerate launch --dynamo_backend) is not supported under "
                        "FSDP: accelerate shards the compiled wrapper, and the loop's direct calls of the UNet "
                        "(reference, gallery, export) would bypass the root's weight gathering. Leave compile off")
    if getattr(accelerator.state.fsdp_plugin, "activation_checkpointing", False):
        raise UserError("fsdp_activation_checkpointing is not supported: accelerate's wrapper recomputes each block "
                        "without its random state, so LoRA dropout draws other masks in the backward (wrong "
                        "gradients). Set it to false and use model.gradient_checkpointing=true, which keeps them")
    if cfg.model.cast_base_unet:
        raise UserError("model.cast_base_unet is not supported under FSDP (it shards the UNet's fp32 adapters and "
                        "half-precision base together, and FSDP2 wants one dtype): leave it off")
    if cfg.train.optimizer in ("adafactor", "adamw8bit"):
        raise UserError(f"train.optimizer={cfg.train.optimizer} does not run under FSDP: its state is kept in plain "
                        "tensors beside the sharded gradients (transformers' Adafactor fails at its first step; "
                        "bitsandbytes reads raw parameter pointers). Use train.optimizer=adamw, whose state FSDP "
                        "shards too")
    processes = accelerator.num_processes
    if cfg.raft.enabled and cfg.raft.prompts_per_round % processes:
        raise UserError(f"under FSDP raft.prompts_per_round ({cfg.raft.prompts_per_round}) must divide evenly over "
                        f"the {processes} processes: sampling is collective, so every process must generate as many "
                        "images as the others")
    _reduce_in_fp32(accelerator.state.fsdp_plugin)
    if cfg.train.mixed_precision == "fp16":
        say(accelerator, "note: fp16 under FSDP is untested; train.mixed_precision=bf16 model.weight_dtype=bf16 is "
                         "the tested choice")


def _reduce_in_fp32(plugin) -> None:
    """accelerate's FSDP policy for bf16 / fp16 reduce-scatters the gradients in that precision too, each
    micro-batch's rounded before it is accumulated (DDP reduces fp32 gradients): reduce in fp32, as DDP does,
    unless the accelerate config chose its own reduce dtype (a policy whose reduce dtype is not its param dtype)."""
    import dataclasses

    import torch

    policy = getattr(plugin, "mixed_precision_policy", None)
    low = getattr(policy, "param_dtype", None)
    if low in (torch.bfloat16, torch.float16) and policy.reduce_dtype == low:
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def check_deepspeed(accelerator, cfg) -> None:
    """Refuse DeepSpeed settings that would silently train otherwise than configured (module docstring), saying what
    to set; fill in those left "auto": the micro-batch size (accelerate reads it from a prepared data loader, and
    the loop prepares none) and the clipping threshold (train.max_grad_norm)."""
    if accelerator.distributed_type != "DEEPSPEED":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization") or {}
    offload = (zero.get("offload_param") or {}).get("device", "none")
    if zero.get("stage", 0) == 3 or offload not in ("none", None):
        raise UserError(f"DeepSpeed ZeRO stage {zero.get('stage')} with parameter offload {offload!r} is not "
                        "supported: it partitions the UNet's weights, and the loop's galleries, sampling, LoRA "
                        "reference and export call the UNet directly. Use ZeRO-2 without offload_param "
                        "(configs/accelerate/deepspeed_zero2.yaml) or FSDP (configs/accelerate/fsdp.yaml)")
    _check_zero_2(zero)
    _check_precision(ds, cfg.train.mixed_precision)
    steps = ds.get("gradient_accumulation_steps", 1)
    if steps not in (1, "auto"):
        raise UserError(f"DeepSpeed's gradient_accumulation_steps is {steps}: the loop accumulates itself "
                        "(train.grad_accum) and the engine would divide the loss again. Set "
                        f"gradient_accumulation_steps to 1 in the accelerate config and train.grad_accum={steps}")
    if cfg.train.optimizer == "adafactor":
        raise UserError("train.optimizer=adafactor under DeepSpeed ZeRO-2 steps on each process's flat slice of "
                        "the weights: its factored moments and update clipping, defined per weight matrix, then "
                        "differ from one GPU's and with the number of GPUs. Use train.optimizer=adamw (ZeRO-2 "
                        "shards its state), or DDP (configs/accelerate/ddp.yaml) for Adafactor")
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":  # accelerate would fill in 1.0 whatever train.max_grad_norm says
        ds["gradient_clipping"] = cfg.train.max_grad_norm
    elif float(clip) != cfg.train.max_grad_norm:
        raise UserError(f"DeepSpeed clips gradients at its gradient_clipping ({clip}), not at train.max_grad_norm "
                        f"({cfg.train.max_grad_norm}): set them equal (0 for no clipping)")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    _skip_nonfinite_bf16_steps(accelerator, ds)


def _check_zero_2(zero: dict) -> None:
    """Refuse ZeRO settings that change the training silently: offload_optimizer (accelerate then swaps the optimizer
    for DeepSpeedCPUAdam, keeping only lr and weight decay: other betas and eps, 8-bit AdamW no longer 8-bit) and
    compute_grad_norm false (the loop reads the norm: non-finite steps and the logged grad_norm)."""
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None):
        raise UserError(f"DeepSpeed's offload_optimizer ({offload!r}) is not supported: accelerate replaces the "
                        "configured optimizer by DeepSpeed's CPU Adam with its own betas and eps. Remove "
                        "offload_optimizer (configs/accelerate/deepspeed_zero2.yaml)")
    if zero.get("compute_grad_norm") is False:
        raise UserError("the DeepSpeed config sets zero_optimization.compute_grad_norm to false: the loop needs the "
                        "gradient norm (it skips non-finite steps and logs grad_norm); remove the setting")


def _check_precision(ds: dict, run: str) -> None:
    """Refuse a DeepSpeed config whose fp16 / bf16 "enabled" is set otherwise than train.mixed_precision: accelerate
    keeps such a value (it fills only "auto"), and the engine trained in it, the loop's checks read the run's."""
    enabled = [name for name in ("fp16", "bf16") if _enabled(ds, name)]
    engine = enabled[0] if enabled else "no"
    if engine != run:
        raise UserError(f"the DeepSpeed config trains in {engine!r} ({engine if enabled else 'fp16 and bf16'}.enabled),"
                        f" and the run config says train.mixed_precision={run!r}, which decides: set fp16.enabled "
                        "and bf16.enabled to \"auto\" in the DeepSpeed config")


def _enabled(ds: dict, precision: str) -> bool:
    """Whether the DeepSpeed config turns `precision` ("fp16", "bf16") on (true, or "true" as JSON text may say)."""
    return str((ds.get(precision) or {}).get("enabled")).lower() == "true"


def _reduce_bf16_in_fp32(ds: dict) -> None:
    """ZeRO-2 in bf16 reduces and accumulates gradients in bf16 by default (DDP reduces fp32 gradients; over 128
    micro-batches, the official recipe's, bf16 sums drift ~1 % from fp32 ones): fp32, unless the config chose."""
    ds.setdefault("communication_data_type", "fp32")
    ds["data_types"] = {"grad_accum_dtype": "fp32", **(ds.get("data_types") or {})}


def _skip_nonfinite_bf16_steps(accelerator, ds: dict) -> None:
    """bf16 ZeRO-2 skips a step with inf / NaN gradients only with bf16.check_grad_overflow (DeepSpeed's default
    since deepspeed PR #8035, off before it): without, one such step turns the fp32 master weights NaN for good,
    where DDP and FSDP skip it (the loop's non-finite guard). Set it; refuse a DeepSpeed that lacks it."""
    bf16 = ds.get("bf16") or {}
    if not (_enabled(ds, "bf16") or getattr(accelerator, "mixed_precision", None) == "bf16"):
        return
    import deepspeed

    try:  # the module came with the setting (deepspeed 0.17.1)
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        DeepSpeedBF16Config = None
    if "check_grad_overflow" not in getattr(DeepSpeedBF16Config, "model_fields", {}):

        raise UserError(f"DeepSpeed {deepspeed.__version__} cannot skip bf16 steps with non-finite gradients (its bf16 "
                        "config has no check_grad_overflow): one would make the weights NaN for good. pip install -U "
                        "deepspeed, or train with FSDP or DDP (configs/accelerate/)")
    if bf16.get("check_grad_overflow") is False:
        raise UserError("the DeepSpeed config sets bf16.check_grad_overflow to false: a step with non-finite "
                        "gradients would then be applied and make the weights NaN for good; remove the setting")
    ds["bf16"] = {**bf16, "check_grad_overflow": True}
    _reduce_bf16_in_fp32(ds)
