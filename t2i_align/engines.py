"""accelerate's engines in the loop: what each supports (checked at start), and the UNet made whole under FSDP.

FSDP (version 2: torch's `fully_shard`) shards the trained UNet in place: the module keeps its class, names and
forward, each block gathering its weights for a forward and freeing them after. So the gallery, RAFT's and reward
fine-tuning's sampling, the LoRA reference (adapters off) and the frozen copy work unchanged, provided every process
runs the same forwards (they are collectives): under FSDP every process samples the gallery and the main process
keeps it. What cannot stay sharded is the export: `whole_unet` gathers the weights.
FSDP version 1 wraps the UNet in a flat-parameter module that the loop's direct calls would bypass: refused.

DeepSpeed (run on CPU processes by tests/test_deepspeed.py) steps its engine inside accelerate's backward, on the
micro-batches accelerate marks as the last before a step (`accelerator.sync_gradients`, set by the loop), and
divides the loss by its own gradient_accumulation_steps, where the loop already divides by train.grad_accum: so
DeepSpeed's must stay 1. It also clips at its own gradient_clipping, not train.max_grad_norm (`check_deepspeed`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .errors import UserError, describe, raise_told


ENGINES_TESTED_WITH = "1.15"
"""The accelerate release tests/test_fsdp.py and tests/test_deepspeed.py ran against."""


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == "FSDP"  # accelerate's DistributedType is a str enum


def engine_name(accelerator) -> str:
    """How a checkpoint's files are laid out: "fsdp" (sharded), "deepspeed" (the engine's own) or "plain" (one
    process and DDP, which write the same files and resume each other)."""
    if is_fsdp(accelerator):
        return "fsdp"
    return "deepspeed" if accelerator.distributed_type == "DEEPSPEED" else "plain"


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed, where installed, is imported in every run (accelerate's unwrap_model looks for its engine), and
    its logger writes to stdout from its import on (the accelerator it detects): what a command prints there, the
    toy demo's JSON, would start with that line. Imported here with stdout pointing at stderr, the stream its
    logger keeps, it logs to stderr for the rest of the process."""
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def say(accelerator, message: str) -> None:
    """A note for the user from the main process, on stderr: stdout is a command's result (the demo's JSON)."""
    accelerator.print(message, file=sys.stderr)


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
    check_fsdp(accelerator, cfg, objective_runs_sharded)
    check_deepspeed(accelerator, cfg)


def on_main(accelerator, work: Callable[[], Any], context: str) -> Any:
    """Collective: `work()` on the main process (its result there, None elsewhere), then every process goes on
    together, or stops if it failed: the main process with its own error, the others with its text under
    `context`. A plain barrier after main-only work (a checkpoint, the export) left the others waiting for a main
    process that had died (a full disk, W&B refusing to start) until train.ddp_timeout, three hours by default."""
    result = failed = None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # told to the others first, then raised here with its traceback
            failed = err
    told = None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        told = broadcast_object_list([describe(failed)])[0]
    if failed is not None:
        raise failed
    raise_told(told, context)
    return result


def on_every(accelerator, work: Callable[[], Any], context: str) -> Any:
    """Collective: `work()` on every process (its result returned), then all go on together, or all stop if it
    failed on any: each failed process with its own error, the others with the first failure's text under
    `context` (accelerate's save_state writes the weights on the main process alone, and each process its own
    random states; on several machines a file missing on one of them failed its processes alone, and the others
    waited for them in their next collective until train.ddp_timeout)."""
    failed = result = None
    try:
        result = work()
    except Exception as err:
        failed = err
    told = []
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        told = [t for t in gather_object([describe(failed)]) if t is not None]
    if failed is not None:
        raise failed
    raise_told(told[0] if told else None, context)
    return result


def check_shared_output(accelerator, out: Path) -> None:
    """`out` must be a folder (or not exist yet). Several processes: fail at start, on every process, unless each
    sees in `out` a file the main process just wrote there. The main process alone writes checkpoints, the RAFT
    pool, SePPO's snapshots and the reward direction, and every process reads them back: on machines without a
    shared file system a resumed run would start from different steps on different machines, or miss those files
    (found by reading; tests run on one host)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: give a folder (it is created if missing)")
    # the export is renamed into place at the end (a link's target replaced): it failed after all the training
    if os.path.ismount(os.path.realpath(out / "final")):
        raise UserError(f"{out / 'final'} is a mount point, which the final export cannot replace (it writes a new "
                        f"folder and renames it into place): mount the volume at output_dir {out} itself instead")
    from .files import check_output_path

    # a file among its parents; no write probe: a process failing it alone would leave the others waiting below, where
    # the main process's own write is told to every process
    check_output_path(out, "output_dir", folder=True, probe=False)
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token, failed = uuid.uuid4().hex, None
    if accelerator.is_main_process:
        try:  # an unwritable folder stops every process, not the main one alone while the others wait
            out.mkdir(parents=True, exist_ok=True)
            (out / f".shared-check-{token}").write_text(token)
        except OSError as err:
            failed = err
    token, told = broadcast_object_list([(token, describe(failed))])[0]  # the main process's, on every process
    if failed is not None:
        raise failed
    raise_told(told, f"the main process could not write in output_dir {out}")
    probe = out / f".shared-check-{token}"
    blind = [i for i, seen in enumerate(gather_object([sees(probe)])) if not seen]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if blind:
        raise UserError(f"output_dir {out} is not shared: processes {blind} do not see the files the main process "
                        "writes there (checkpoints, the RAFT pool, SePPO snapshots). Put output_dir on a file system "
                        "every machine mounts (NFS, Lustre, ...)")


SHARED_WAIT_S = 90
"""How long a process looks for the main process's probe: NFS caches a lookup of a path that did not exist yet
(output_dir before the main process made it) until its folder's cached attributes expire (acdirmin..acdirmax, 30
to 60 s by default), so a shared output_dir of a fresh run could look unshared at the first look."""


def sees(probe: Path, wait_s: Optional[float] = None) -> bool:
    """Whether `probe` shows up within SHARED_WAIT_S, its folder and the folder's parent listed at each look (a
    listing revalidates a network file system's cached view of a folder)."""
    deadline = time.monotonic() + (SHARED_WAIT_S if wait_s is None else wait_s)
    while True:
        for folder in (probe.parent.parent, probe.parent):
            with contextlib.suppress(OSError):
                os.listdir(folder)
        if probe.is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


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


def _skip_nonfinite_bf16_steps(accelerator, ds: dict) -> None:
    """bf16 ZeRO-2 skips a step with inf / NaN gradients only with bf16.check_grad_overflow (DeepSpeed's default
    since deepspeed PR #8035, off before it): without, one such step turns the fp32 master weights NaN for good,
    where DDP and FSDP skip it (the loop's non-finite guard). Set it; refuse a DeepSpeed that lacks it."""
    bf16 = ds.get("bf16") or {}
    if not (str(bf16.get("enabled")).lower() == "true" or getattr(accelerator, "mixed_precision", None) == "bf16"):
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


def loss_scaled(accelerator) -> bool:
    """Whether fp16 loss scaling is in play, under which an overflowing step is skipped by design: accelerate's
    GradScaler, or DeepSpeed's own fp16 scaler (accelerate has no scaler then; DeepSpeed fp16 is not run here)."""
    return accelerator.scaler is not None or (accelerator.distributed_type == "DEEPSPEED"
                                              and accelerator.mixed_precision == "fp16")


def autocast(accelerator):
    """The context the UNet runs in: accelerate's autocast, except where the DeepSpeed engine holds the UNet in
    fp16/bf16 (`half_precision_autocast`)."""
    return half_precision_autocast(accelerator) or accelerator.autocast()


def half_precision_autocast(accelerator):
    """torch.autocast to the engine's dtype under DeepSpeed with fp16/bf16, else None. DeepSpeed casts the UNet's
    weights to that dtype and accelerate autocasts nothing under it, so the fp32 latents and text states would meet
    half-precision weights ("mat1 and mat2 must have the same dtype") in training, galleries and sampling."""
    if accelerator.distributed_type != "DEEPSPEED" or accelerator.mixed_precision not in ("fp16", "bf16"):
        return None
    dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(accelerator.device.type, dtype=dtype)


def full_weights(accelerator, unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The UNet's state dict with every weight in one piece. Without FSDP: its own state dict (views, no copy).
    Under FSDP (collective: every process calls it): gathered onto the main process's CPU; empty elsewhere."""
    if not is_fsdp(accelerator):
        return unet.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_unet(accelerator, unet: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The UNet with every weight in one piece, for the export. Without FSDP: `unet` itself. Under FSDP
    (collective: every process calls it): its full state dict gathered onto the main process's CPU, loaded into a
    plain copy of the same class and adapters (LoRA, PPD's user branch) there; None on the other processes."""
    if not is_fsdp(accelerator):
        return unet
    state = full_weights(accelerator, unet)
    return on_main(accelerator, lambda: _plain_copy(unet, state),
                   "the main process could not build the whole UNet for the export")


def _plain_copy(unet: torch.nn.Module, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Main process: a plain (unsharded) copy of the FSDP-wrapped `unet` holding the gathered `state`."""
    from torch.distributed.fsdp import FSDPModule

    from .conditioning.users import add_user_branch, has_user_branch, user_branch_layout

    # fully_shard made the class FSDP<Name>(FSDPModule, Name): the first base that is not FSDP's is the model's.
    # With a user branch the config says "ip_image_proj", which from_config cannot build: add_user_branch does
    plain = next(c for c in type(unet).__mro__[1:] if not issubclass(c, FSDPModule))
    branch = user_branch_layout(unet) if has_user_branch(unet) else None  # PPD
    # Built on the meta device (no memory, no random init), then given the gathered tensors themselves: the host
    # holds the weights once. The adapters as the loop added them: LoRA first, then the user branch.
    with torch.device("meta"):
        copy = plain.from_config({**unet.config, "encoder_hid_dim_type": None} if branch else unet.config)
        for name, config in (getattr(unet, "peft_config", None) or {}).items():
            copy.add_adapter(config, adapter_name=name)
        if branch:
            add_user_branch(copy, branch[0], branch[1], scale=branch[2])
    copy.load_state_dict(state, assign=True)  # strict; keeps each tensor's dtype (LoRA fp32 beside a bf16 base)
    left = [name for name, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer is in no state dict
        raise RuntimeError(f"the FSDP export could not fill {left[:5]} of {plain.__name__} from the gathered weights")
    return copy.eval()
