"""accelerate's engines in the loop: the main process's work told to every process, output_dir shared, and the UNet
made whole under FSDP (what each engine supports is checked at start in `engine_checks.py`).

FSDP (version 2: torch's `fully_shard`) shards the trained UNet in place: the module keeps its class, names and
forward, each block gathering its weights for a forward and freeing them after. So the gallery, RAFT's and reward
fine-tuning's sampling, the LoRA reference (adapters off) and the frozen copy work unchanged, provided every process
runs the same forwards (they are collectives): under FSDP every process samples the gallery and the main process
keeps it. What cannot stay sharded is the export: `whole_unet` gathers the weights.
FSDP version 1 wraps the UNet in a flat-parameter module that the loop's direct calls would bypass: refused.
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

    # a file among its parents; a write probe on one process (a read-only output_dir failed after the model was built),
    # below for several: a process failing it alone would leave the others waiting, where the main process's own
    # write is told to every process
    check_output_path(out, "output_dir", folder=True, probe=accelerator.num_processes == 1)
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
