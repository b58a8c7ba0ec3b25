"""Resumable checkpoints (accelerate's save_state) and the final diffusers-loadable export.

Every checkpoint is written into a hidden temporary folder and renamed to `checkpoints/step-N` only once
complete (a marker file is written last), so a kill at any moment leaves a complete checkpoint or none.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from .errors import UserError, load_refusal, one_line
from .files import browser_leftover, fsync_path, plain_modes, staged_dir, sync_tree
from .full_export import save_full_pipeline

logger = logging.getLogger(__name__)
MARKER = "t2i_align_checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointMismatch(UserError, RuntimeError):
    """A checkpoint written by a run with other settings (LoRA targets or rank) than this one."""


class CheckpointDamaged(UserError, ValueError):
    """A checkpoint file that cannot be read: cut short (a copy or disk that failed), overwritten, or a pickle
    with code in it, which `weights_only` loading refuses."""


DAMAGED_HINT = "resume from another checkpoint (train.resume=FOLDER) or start fresh without train.resume"
_LOADED = ("model*.safetensors", "optimizer*.bin", "scheduler*.bin", "scaler.pt")
"""accelerate's files whose damage stops its load_state (its RNG states it skips, with an info line)."""


def damaged(path: Path, name: str, err: BaseException) -> CheckpointDamaged:
    if isinstance(err, pickle.UnpicklingError):  # torch's text advises weights_only=False first: not for this
        return CheckpointDamaged(f"checkpoint {path}: its file {name} holds {load_refusal(err)}: not written by "
                                 f"accelerate, or by another torch or numpy version; {DAMAGED_HINT}")
    return CheckpointDamaged(f"checkpoint {path}: its file {name} cannot be read ({type(err).__name__}: "
                             f"{one_line(err)[:200]}): cut short or overwritten? {DAMAGED_HINT}")


def find_damaged(path: Path) -> Optional[CheckpointDamaged]:
    """The first of the checkpoint's files that does not load, as the error to raise, checked before a resume
    loads it (accelerate's errors name no file). Its weights and optimizer, scheduler and scaler states are loaded
    as accelerate loads them (weights_only; mmap: no optimizer state read whole); its RNG states, which accelerate
    skips where they do not load, only checked to be whole (a healthy one of another numpy version is skipped
    there, not refused here). One process's / DDP's layout only: FSDP's and DeepSpeed's files are pickles that
    weights_only loading refuses, damaged or not."""
    from accelerate.utils.other import load
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not (root / "model.safetensors").is_file():
        return None
    for file in sorted({f for pattern in (*_LOADED, "random_states_*.pkl") for f in root.glob(pattern)}):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
                continue
            if not zipfile.is_zipfile(file):  # torch.save's format; a cut copy loses the zip's directory
                raise ValueError("not a torch.save archive")
            if file.suffix == ".pkl":
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()  # each member's checksum
                if bad:
                    raise ValueError(f"{bad} fails its checksum")
            else:
                load(file, map_location="cpu", mmap=True)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            return damaged(root, file.name, err)
    return None


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> List[Tuple[int, Path]]:
    """Complete checkpoints (named step-N and holding the marker), oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_everywhere(accelerator, output_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    """`resolve_resume` on every process (a bad path fails on all), checked to name one checkpoint on all (a
    collective): with `latest`, a machine whose network file system listing is stale would resume from another
    step, its processes training other weights (DDP syncs them only when it wraps the model) for another length.
    A path missing on some machines only (a folder not shared) fails on all: the others waited in the gather."""
    try:
        path, missing = resolve_resume(output_dir, resume), None
    except FileNotFoundError as err:
        if accelerator.num_processes == 1:
            raise
        path, missing = None, str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        found = gather_object([(path, missing)])
        failed = [text for _, text in found if text is not None]
        if failed:  # on some processes only: another machine's view of the files
            some = len(failed) < len(found)
            raise FileNotFoundError(failed[0] + (f" (on {len(failed)} of {len(found)} processes: is the folder on a "
                                                 "file system every machine shares?)" if some else ""))
        seen = sorted({str(p) for p, _ in found})
        if len(seen) > 1:
            raise UserError(f"train.resume={resume}: the processes found different checkpoints ({', '.join(seen)}), "
                            "a file system that had not yet shown every machine the newest one: relaunch, or name "
                            "the checkpoint folder")
    return path


def resolve_resume(output_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    """None (fresh run), "latest" (newest complete checkpoint, or None if there is none) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    what = "does not exist" if not path.exists() else f"is not a complete checkpoint folder (no {MARKER})"
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume={resume!r} {what}; use train.resume=latest or one of "
                                f"{checkpoints_dir(output_dir)}/step-N")
    return path


def read_marker(path: Path) -> dict:
    """The checkpoint's marker: {"step": N, ...what the loop recorded, e.g. "raw_batches"}."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        int(marker["step"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise damaged(Path(path), MARKER, err) from err
    return marker


def resume_raw_batches(marker: dict, index: int, processes: int, fallback: int) -> int:
    """How many raw micro-batches this process skips on resume. The marker holds one count per process (each
    process replaces its own all-corrupt batches, so the counts can differ); a checkpoint from before that holds
    one number, used by every process. With another number of processes no position is exact (offline data is
    sharded anew; online sources count per process): each skips `fallback` (the steps taken x grad_accum)."""
    raw = marker.get("raw_batches", fallback)
    if not isinstance(raw, list):
        return int(raw)
    if len(raw) == processes:
        return int(raw[index])
    logger.warning("the checkpoint was written by %d processes and this run has %d: the data order cannot be "
                   "resumed exactly; each process starts after %d micro-batches", len(raw), processes, fallback)
    return fallback


def checkpoint_step(path: Path) -> int:
    return int(read_marker(path)["step"])


def save_only_trainable(accelerator) -> None:
    """LoRA runs: checkpoints keep only the trainable (adapter) weights; the frozen UNet is model.pretrained's.
    (accelerate would store the whole UNet: ~3.4 GB per SD1.5 checkpoint instead of a few MB.) Under FSDP and
    DeepSpeed accelerate saves the (sharded) model itself and hands this hook no state dicts: those checkpoints
    keep every weight."""
    def keep_trainable(models, weights, output_dir):
        for i, model in enumerate(models[:len(weights)]):
            names = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(keep_trainable)


def all_finite(params) -> bool:
    return all(torch.isfinite(p.detach()).all().item() for p in params)


def _remove_unmarked(root: Path, step: int) -> None:
    """Checkpoints below `step` without their marker: a keep_checkpoints deletion killed halfway (it deletes the
    marker first), GBs that pruning, which sees marked ones only, never removed."""
    for part in root.glob("step-*"):
        match = STEP_DIR.match(part.name)
        if match and int(match.group(1)) < step and part.is_dir() and not part.is_symlink() \
                and not (part / MARKER).exists():
            logger.warning("removing %s: a checkpoint without its marker (a deletion stopped halfway)", part)
            shutil.rmtree(part, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int, params,
                    marker: Optional[dict] = None, save_extra: Optional[Callable[[Path], None]] = None
                    ) -> Optional[Path]:
    """Collective: every process calls it. Returns the checkpoint path (None if weights were non-finite).

    `marker` adds entries to the marker JSON (written last); `save_extra(folder)` writes more state (e.g. a
    reference pool) into the folder on the main process before it is marked complete. Keep-last-K removes only
    checkpoints older than this one."""
    from .engines import on_every, on_main, say

    if not all_finite(params):
        say(accelerator, f"step {step}: non-finite weights, checkpoint NOT written")
        return None

    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"

    def begin() -> None:
        for stale in root.glob(".step-*.tmp"):  # this step's, and a killed write's (GBs of a full state)
            shutil.rmtree(stale, ignore_errors=True)
        _remove_unmarked(root, step)
        root.mkdir(parents=True, exist_ok=True)

    def complete() -> None:
        if save_extra is not None:
            save_extra(tmp)
        if (Path(output_dir) / "config.yaml").is_file():  # each checkpoint says how it was made, wherever it goes
            shutil.copyfile(Path(output_dir) / "config.yaml", tmp / "config.yaml")
        plain_modes(tmp)
        sync_tree(tmp)  # on the disk before the marker says complete and older checkpoints are deleted
        _sync_logs(Path(output_dir))
        (tmp / MARKER).write_text(json.dumps({**(marker or {}), "step": step}))
        fsync_path(tmp / MARKER)
        shutil.rmtree(final, ignore_errors=True)  # only an unmarked leftover can have this name
        tmp.rename(final)
        fsync_path(root)
        _keep_last(output_dir, step, keep)

    save_state = functools.partial(accelerator.save_state, str(tmp), safe_serialization=True)
    on_main(accelerator, begin, f"the main process could not start checkpoint {final}")
    try:
        if accelerator.distributed_type in ("FSDP", "DEEPSPEED"):
            # Collectives inside (FSDP's sharded writes, which raise a write error on every process themselves;
            # DeepSpeed's barriers): a process failing there cannot tell the others in a collective after them.
            save_state()
            accelerator.wait_for_everyone()  # every process's files are in tmp before the main process renames it
        else:
            on_every(accelerator, save_state, f"another process could not write checkpoint {final}")
        on_main(accelerator, complete, f"the main process could not complete checkpoint {final}")
    except KeyboardInterrupt:  # Ctrl-C mid-write: its half-written state (GBs) is not left for the next checkpoint
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:
        _failed_write(accelerator, err, root, tmp, final)
        raise
    return final


def _keep_last(output_dir, step: int, keep: int) -> None:
    """Checkpoints older than `step` removed but the newest `keep - 1` (with `step`'s, `keep` are left)."""
    older = [path for s, path in list_checkpoints(output_dir) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        if old.is_symlink():  # a link to a checkpoint kept elsewhere (an archive): only the link goes
            old.unlink()
            continue
        (old / MARKER).unlink(missing_ok=True)  # first: a deletion stopped halfway leaves no "complete" one
        shutil.rmtree(old, ignore_errors=True)


def _sync_logs(output_dir: Path) -> None:
    """The run's logs on the disk before a checkpoint is marked complete: a resume goes on after their lines."""
    for log in ("metrics.jsonl", "raft_rounds.jsonl"):
        if (output_dir / log).is_file():
            fsync_path(output_dir / log)


def _failed_write(accelerator, err: Exception, root: Path, tmp: Path, final: Path) -> None:
    """After a checkpoint write failed: its half-written state removed (GBs that kept the disk full for the
    relaunch too), and a full disk said so (torch's own error for it: "unexpected pos 77632 vs 77524")."""
    free = shutil.disk_usage(root).free if root.is_dir() else None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if free is not None and free < DISK_FULL_BYTES:
        raise UserError(f"checkpoint {final} could not be written: the disk holding it is full ({free >> 20} MiB "
                        f"free; {type(err).__name__}: {one_line(err)[:200]}). Free space (a run keeps "
                        "train.keep_checkpoints checkpoints and writes one more) and relaunch with "
                        "train.resume=latest") from err


DISK_FULL_BYTES = 256 << 20
"""Free space under which a failed checkpoint write is reported as a full disk."""


FINAL_STEP_FILE = "t2i_align_final.json"
"""In final/: the step it was exported at (a resume from an earlier step sets it aside only when it is later)."""


def export_final(pipeline, unet, adapters: bool, output_dir: str | os.PathLike, user_table=None,
                 base_model: Optional[str] = None, step: Optional[int] = None, vae: Optional[str] = None,
                 vae_dir: Optional[Path] = None) -> Path:
    """`final/`, renamed into place when complete. Adapters (`adapters`): pytorch_lora_weights.safetensors when
    LoRA trained (`pipe.load_lora_weights`) and user_branch.safetensors when PPD's user branch did (plain
    diffusers: `pipe.load_ip_adapter(final, subfolder="", weight_name="user_branch.safetensors",
    image_encoder_folder=None)`). Full fine-tune: a pipeline folder with the tuned unet/ (`from_pretrained`), a
    user branch, if any, saved beside it rather than inside unet/. `user_table` (PPD) is copied to
    final/user_table.safetensors, so the folder holds everything needed to sample for a user. Both record the
    model they trained on (`base_model`: model.pretrained as given, and its folder) for `base_model.warn_other_base`,
    and `vae` (model.vae, loaded from `vae_dir`) if the run decoded with another VAE than the folder's (a full
    export holds it in vae/)."""
    from .conditioning.text import write_text_encoding
    from .base_model import write_base_model
    from .sampling import pipeline_components

    out = Path(output_dir) / "final"
    for stale in Path(output_dir).glob(".final.tmp*"):  # a killed export's (a failing one removes its own)
        shutil.rmtree(stale, ignore_errors=True)
    components = pipeline_components(pipeline)
    with staged_dir(out) as tmp:
        if adapters:
            _save_adapters(pipeline, unet, tmp)
        else:
            save_full_pipeline(pipeline, unet, tmp, exact_frozen=True, vae_dir=vae_dir)
        if user_table is not None:
            from .users.table import USER_TABLE_NAME

            user_table.save(tmp / USER_TABLE_NAME)
        # A model tuned with segment encoding must be sampled with it: load_pipeline reads this record.
        write_text_encoding(tmp, components.text_encoding.kind, components.text_encoding.token_budget)
        # adapters: sampling warns when they are applied to another model folder; a full export: its lineage
        write_base_model(tmp, components.path, base_model, vae_dir=vae_dir, vae_given=vae)
        if step is not None:
            (tmp / FINAL_STEP_FILE).write_text(json.dumps({"step": step}))
        _keep_added(out, tmp)
    return out


def _keep_added(final: Path, new: Path) -> None:
    """Before a new export replaces final/ (a run extended from the step it ended at): a final/ holding what no
    export writes (samples generated into it, notes) is moved aside whole to final-kept-N/, not deleted. A final/
    that links elsewhere: its target is what the export replaces (`staged_dir`), so the target is moved aside."""
    final = final.resolve() if final.is_symlink() else final
    if not final.is_dir():
        return
    added = sorted({p.name for p in final.iterdir() if not browser_leftover(p.name)} - {p.name for p in new.iterdir()})
    if added:
        kept = next(k for i in range(1, 10_000) if not (k := final.with_name(f"{final.name}-kept-{i}")).exists())
        final.rename(kept)
        logger.warning("%s held %s, which the new export does not write: the earlier export was moved to %s",
                       final, ", ".join(added[:3]), kept)


def _save_adapters(pipeline, unet, folder: Path) -> None:
    from .conditioning.users import has_user_branch, save_user_branch

    folder.mkdir(parents=True, exist_ok=True)
    if getattr(unet, "peft_config", None):
        from peft.utils import get_peft_model_state_dict

        # peft key names as they are: diffusers' convert_state_dict_to_diffusers rewrites only attention keys to
        # the old lora.up/down names, and a file mixing both formats silently loses the attention adapters.
        layers = _alpha_folded(get_peft_model_state_dict(unet), unet.peft_config["default"])
        type(pipeline).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    if has_user_branch(unet):
        save_user_branch(folder, unet)


def _alpha_folded(layers: dict, config) -> dict:
    """The LoRA scale alpha / rank multiplied into every lora_B: a file without alpha loads at alpha = rank in
    diffusers (unless it carries diffusers' own metadata) and in other tools, so a run with lora.alpha != rank
    would sample at another strength than it trained with. The folded file gives the trained output anywhere.
    (`adapters.add_lora` sets one alpha and rank for every layer, no rsLoRA.)"""
    scale = config.lora_alpha / config.r
    if scale == 1:
        return layers
    return {key: value * scale if ".lora_B." in key else value for key, value in layers.items()}
