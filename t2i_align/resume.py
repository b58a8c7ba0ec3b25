"""A run's start in its output folder, and what a checkpoint records of the loop for a resume to restore.

`check_resume` refuses, before the model loads, a checkpoint the run cannot go on from; `claim_output` makes
output_dir this run's; `record` is what each checkpoint's marker holds of the loop (each
process's data position, the run's running totals, the metrics not yet logged and the non-finite streak);
`restore` loads a checkpoint and gives the loop back the state an uninterrupted run would have at its step, so
the resumed run logs the same lines and stops where it would have.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .checkpoints import CheckpointMismatch, checkpoint_step, find_damaged, read_marker, resume_raw_batches
from .config import Config, TrainConfig, config_to_dict, save_config
from .engines import engine_name, on_every, on_main, say
from .errors import UserError
from .optim import align_lr_schedule
from .references import POOL_STATE_FILE
from .resume_settings import NOT_APPLIED, changed_settings, check_same_model, checkpoint_config, setting
from .run_dir import prepare_run_dir, set_aside_newer

COUNTED = ("data_batches_skipped", "data_rows_skipped", "steps_skipped_nonfinite")
"""The loop's running totals, logged and restored on a resume."""

SUMMED = ("data_batches_skipped", "data_rows_skipped", "prompts_truncated")
"""Logged counts that each process keeps of its own data: the run's figure is their sum."""


ENGINES = {"plain": "one process or DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}


RESUME_HINT = "Resume with the run's own config, or start fresh without train.resume"


def _is_mismatch(err: Exception) -> bool:
    """torch's errors for a state that does not fit: the model's keys or shapes, the optimizer's parameter groups
    or its state's keys (another optimizer)."""
    text = str(err)
    return (type(err) is RuntimeError and text.startswith("Error(s) in loading state_dict")
            or type(err) is ValueError and "parameter group" in text or type(err) is KeyError)


def check_checkpoint_fits(path: Path, model: torch.nn.Module, trainable_only: bool) -> bool:
    """CheckpointMismatch unless the checkpoint's weights file holds this run's trainable weights as shaped here
    (`trainable_only`: adapters, exactly those) or every weight of the model (a full fine-tune); made before a
    resume claims output_dir (a LoRA of another rank failed in the load, the earlier run already set aside). FSDP
    and DeepSpeed layouts are left to their engines. CheckpointDamaged if one of its files does not load (cut
    short or overwritten). Returns whether the file holds the adapters only."""
    if not (path / "model.safetensors").is_file():  # not one process's / DDP's layout
        return False
    damaged = find_damaged(path)  # before the run sets the earlier one aside; accelerate skips bad RNG states
    if damaged:
        raise damaged
    from safetensors import safe_open

    state = None if trainable_only else model.state_dict()
    params = model.named_parameters() if state is None else state.items()
    wanted = {name: tuple(p.shape) for name, p in params if p.requires_grad or state is not None}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wrong = sorted(n for n, shape in wanted.items() if stored.get(n) != shape)
    if wrong and state is not None:  # tied weights are saved once
        wrong = [n for n in wrong if not _alias_stored(n, state, stored)]
    extra = sorted(set(stored) - set(wanted))  # narrower LoRA targets, PPD's branch turned off
    if wrong or extra:
        what = (f"does not hold {len(wrong)} weights this run trains, as shaped here (e.g. {wrong[0]})" if wrong
                else f"holds {len(extra)} weights this run does not train (e.g. {extra[0]})")
        raise CheckpointMismatch(f"checkpoint {path} {what}: written with other LoRA or PPD settings, or a LoRA "
                                 f"run's for a full fine-tune or the reverse? {RESUME_HINT}")
    return trainable_only


def _alias_stored(name: str, state: dict, stored: dict) -> bool:
    """Whether weight `name` shares its storage with another weight the file holds: safetensors saves tied weights
    once (`load_model` accepts that)."""
    ptr = state[name].data_ptr()
    return any(other in stored for other, t in state.items() if other != name and t.data_ptr() == ptr and ptr)


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, trainable_only: bool) -> int:
    """Restore a checkpoint; with `trainable_only` its weights must cover every trainable parameter (a LoRA
    checkpoint with other targets or rank fails here, naming what is missing; FSDP and DeepSpeed checkpoints,
    which hold every weight in their engine's own files, are left to the engine's checks). Returns its step."""
    adapters_file = check_checkpoint_fits(path, model, trainable_only)
    try:  # strict=False: the file holds the adapters only. Engines get no such argument (DeepSpeed's takes none).
        accelerator.load_state(str(path), **({"strict": False} if adapters_file else {}))
    except (RuntimeError, ValueError, KeyError) as err:  # torch's own mismatch errors: a traceback of key lists
        if not _is_mismatch(err):  # a CUDA or NCCL fault: its own error and traceback (damaged files: above)
            raise
        why = " ".join(str(err).split())[:300]  # one line: torch's lists every missing key on its own line
        raise CheckpointMismatch(f"checkpoint {path} does not fit this run ({type(err).__name__}: {why}): was it "
                                 "written with other lora, ppd or train.optimizer settings, or as a full fine-tune? "
                                 f"{RESUME_HINT}") from err
    return checkpoint_step(path)


def check_resume(path: Path, engine: str, processes: int, max_steps: int, output_dir, warn: bool = True,
                 train: Optional[TrainConfig] = None, method: Optional[Tuple[str, bool]] = None,
                 settings: Optional[dict] = None) -> None:
    """Before the model loads, refuse a checkpoint this run cannot go on from: one past max_steps (its weights
    would be exported labelled max_steps), one written under another engine (ENGINES: their files differ; the load
    failed only after the model was built), or an FSDP / DeepSpeed one written by another number of processes
    (ZeRO-2's optimizer shards fail to load on another; FSDP's resharding is untested). Markers from before
    session 28 name no engine and are left to the engine's load. `warn` (the main process): that FSDP / DeepSpeed
    unpickle a checkpoint from outside output_dir. `train` (the run's settings): `_check_training`. `method` (the
    run's objective name, raft.enabled): `_warn_other_method`. `settings` (the run's, `config_to_dict`):
    `check_same_model`."""
    marker = read_marker(path)
    if settings is not None:
        check_same_model(path, settings, warn)
    if int(marker["step"]) > max_steps:
        raise UserError(f"train.resume: {path} is at step {marker['step']}, past train.max_steps={max_steps}; set "
                        f"train.max_steps above it to train on{_its_export(path)}")
    if method is not None and method[0] == "seppo" and not (path / POOL_STATE_FILE).is_file():
        wrote = setting(checkpoint_config(path)[1], "objective.name")
        why = f"it was written by objective {wrote!r}" if wrote not in (None, "seppo") else "its file is missing"
        raise CheckpointMismatch(f"train.resume: {path} holds no SePPO reference pool ({POOL_STATE_FILE}): {why}. "
                                 "To start SePPO from its weights, export the checkpoint and give it as "
                                 "model.pretrained (README: Sampling)")
    if method is not None and warn:
        _warn_other_method(path, _method(*method))
    written = marker.get("engine")
    if written is None:
        return
    if written != engine:
        raise CheckpointMismatch(f"train.resume: {path} was written under {ENGINES.get(written, written)} and this "
                                 f"run uses {ENGINES[engine]}: relaunch with the accelerate config that wrote it, "
                                 "or start fresh without train.resume")
    wrote = marker.get("raw_batches")  # one count per process
    if engine != "plain" and isinstance(wrote, list) and len(wrote) != processes:
        raise CheckpointMismatch(f"train.resume: {path} was written by {len(wrote)} processes under "
                                 f"{ENGINES[engine]} and this run has {processes}: launch {len(wrote)} processes "
                                 "(num_processes) to resume it")
    if train is not None:  # after the engine's checks: a DeepSpeed fp16 checkpoint has no scaler.pt of its own
        _check_training(path, marker, train, engine, warn)
    if warn and engine != "plain" and not path.resolve().is_relative_to(Path(output_dir).resolve()):
        warnings.warn(f"train.resume: {ENGINES[engine]} reads its checkpoint's states with pickle (DeepSpeed's "
                      "torch.load without weights_only, torch's distributed checkpoint metadata), which can run "
                      f"code planted in the files: resume only from checkpoints you trust ({path} is not this "
                      "run's own)")


OPTIMIZER_STATE = {"adamw": "AdamW", "adamw_fused": "AdamW", "adafactor": "Adafactor", "adamw8bit": "AdamW8bit"}
"""train.optimizer -> the optimizer whose state a checkpoint holds (AdamW's fused flag is in its saved groups)."""


def _its_export(path: Path) -> str:
    """The export of the run that wrote checkpoint `path` (OUT/checkpoints/step-N -> OUT/final), where there is
    one: the weights of its last step, not of this checkpoint's."""
    folder = Path(path).resolve().parent
    final = folder.parent / "final"
    return f", or use that run's export {final} (its last step's weights)" if folder.name == "checkpoints" and \
        final.is_dir() else ""


def check_resume_settings(path: Path, cfg: Config) -> None:
    """`check_resume` without a launcher (`--dry-run`): the step, optimizer, precision and method checks; the
    engine and the number of processes are taken as the checkpoint's (the launch is checked when the run starts)."""
    marker = read_marker(path)
    wrote = marker.get("raw_batches")
    check_resume(path, marker.get("engine") or "plain", len(wrote) if isinstance(wrote, list) else 1,
                 cfg.train.max_steps, cfg.output_dir, train=cfg.train, method=(cfg.objective.name, cfg.raft.enabled),
                 settings=config_to_dict(cfg))


def _check_training(path: Path, marker: dict, train: TrainConfig, engine: str, warn: bool) -> None:
    """Refuse an optimizer whose state the checkpoint's is not (torch loads it anyway; the first step then failed,
    e.g. KeyError 'beta1' in Adafactor) and fp16 from a checkpoint without its loss scaler (accelerate's
    load failed on a missing scaler.pt, read as a damaged checkpoint); warn of a batch size that moves the data
    position (the marker counts micro-batches: from 1 to 2 pairs, twice as many rows are skipped as trained on)."""
    wrote = marker.get("optimizer")
    if wrote is not None and OPTIMIZER_STATE.get(wrote) != OPTIMIZER_STATE.get(train.optimizer):
        raise CheckpointMismatch(f"train.resume: {path} holds the state of train.optimizer={wrote} and this run has "
                                 f"train.optimizer={train.optimizer}: resume with {wrote}, or start fresh")
    if train.mixed_precision == "fp16" and engine != "deepspeed" and not (path / "scaler.pt").is_file():
        raise CheckpointMismatch(f"train.resume: {path} was written without fp16 (no loss-scaler state, scaler.pt), "
                                 "and this run has train.mixed_precision=fp16: resume with the precision it was "
                                 "written with (bf16 or no), or start fresh")
    size = marker.get("batch_size")
    if warn and size is not None and size != train.batch_size:
        effect = "rows skipped" if train.batch_size > size else "rows seen again"
        warnings.warn(f"train.resume: {path} was written at train.batch_size={size} and this run has "
                      f"{train.batch_size}: the data position is counted in batches, so this epoch resumes at "
                      f"another row than the checkpoint reached ({effect})", stacklevel=2)


@dataclass
class Restored:
    """Where the loop starts: step 0 and nothing counted, or a checkpoint's state."""

    step: int = 0
    counts: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED + ("raw_batches",), 0))
    """COUNTED and raw_batches (this process's raw micro-batches read)."""
    history: List[Dict[str, float]] = field(default_factory=list)
    """This process's metrics of the micro-batches since the last log line."""
    streak: int = 0
    """Consecutive steps that count towards train.max_nonfinite_steps."""


def claim_output(cfg: Config, out: Path, resume, log, tracker) -> None:
    """Main process: output_dir made this run's (`prepare_run_dir`), then the run's config and W&B id written
    there; a resume names the settings that differ from the checkpoint's run."""
    prepare_run_dir(out, resume, cfg.train.resume, log)
    if resume is None:  # a resume records it after `set_aside_newer` has kept the abandoned run's
        tracker.record_run_id()
    earlier, before = checkpoint_config(resume) if resume is not None else (None, None)
    changed = changed_settings(before, config_to_dict(cfg)) if isinstance(before, dict) else []
    if changed:
        log(f"resuming with settings that differ from the checkpoint's run ({earlier}): {', '.join(changed)}")
    # what the run trains with: a setting the resume does not apply keeps the checkpoint's value in the record
    kept = {name: setting(before, name) for name in NOT_APPLIED if setting(before, name) is not None}
    save_config(cfg, out / "config.yaml", overrides=kept)


def _warn_other_method(path: Path, method: str) -> None:
    """A resume under another method (objective, online or not) goes on, as asked, but warned: the weights, the
    optimizer's moments, the step count and the LR schedule are the other method's, and its data position and
    row counts refer to the other data (it went on with a note among the changed settings)."""
    before = checkpoint_config(path)[1]
    name, online = setting(before, "objective.name"), setting(before, "raft.enabled")
    if isinstance(name, str) and _method(name, bool(online)) != method:
        warnings.warn(f"train.resume: {path} was written by {_method(name, bool(online))} and this run is {method}: "
                      "it goes on from that run's weights, optimizer moments, step and LR schedule, and its data "
                      "counts describe the other data. To start the new method afresh from those weights, export "
                      "the checkpoint and give it as model.pretrained (README: Sampling)", stacklevel=2)


def _method(objective: str, online: bool) -> str:
    return f"objective {objective!r}" + (" with online rounds (raft.enabled)" if online else "")


def restore(cfg: Config, accelerator, m, parts, tracker, resume, carried) -> Restored:
    """Nothing (no `resume`), or what the checkpoint `resume` restored: `m`'s weights, optimizer and LR schedule
    (moved to this number of processes), the raw micro-batches this process read, the run's totals of skipped data
    and steps (`carried`'s counters set too), the unlogged metrics and the non-finite streak. `parts` (the
    reference provider, the data source, PPD's user lookup) reload what they keep beyond weights and data."""
    if resume is None:
        return Restored()
    out = Path(cfg.output_dir)
    start = load_checkpoint(accelerator, resume, m.raw_unet, not cfg.full_finetune)
    marker = read_marker(resume)
    _check_rows(resume, marker, m.source, accelerator.is_main_process)
    written_by = marker.get("raw_batches")  # one count per process (older markers: one number)
    align_lr_schedule(m.lr_sched, len(written_by) if isinstance(written_by, list) else accelerator.num_processes,
                      accelerator.num_processes)
    state = Restored(start, history=_history(marker, accelerator), streak=int(marker.get("streak", 0)))
    state.counts["raw_batches"] = resume_raw_batches(marker, accelerator.process_index, accelerator.num_processes,
                                                     fallback=start * cfg.train.grad_accum)
    for key, total in marker.get("counts", {}).items():  # a sum over processes is the main process's to log
        value = int(total) if key not in SUMMED or accelerator.is_main_process else 0
        if key in carried:
            setattr(*carried[key], value)
        elif key in state.counts:
            state.counts[key] = value
    # SePPO's snapshot pool, RAFT's round: on every process, all stopping if one cannot read its part
    on_every(accelerator, lambda: [part.load(resume) for part in parts if hasattr(part, "load")],
             f"another process could not restore the run's state from {resume}")
    on_main(accelerator, lambda: set_aside_newer(out, start, functools.partial(say, accelerator)),
            "the main process could not set the abandoned run's checkpoints aside")
    on_main(accelerator, tracker.record_run_id, "the main process could not record the W&B run id")
    on_main(accelerator, lambda: tracker.truncate_after(start), "the main process could not rewrite metrics.jsonl")
    say(accelerator, f"resumed from {resume} at step {start}")
    return state


def _check_rows(path: Path, marker: dict, source, warn: bool) -> None:
    """Warn when the data differs in size from the checkpoint's run (files added or removed since, a download
    still under way at the first start): the order is drawn from the rows, so the resumed epoch repeats or skips
    rows that the uninterrupted run would not have."""
    source = getattr(source, "source", source)
    wrote, now = marker.get("data_rows"), getattr(source, "data_rows", None)
    if warn and wrote is not None and now is not None and wrote != now:
        warnings.warn(f"train.resume: {path} was written with {wrote} usable data rows and this run has {now}: the "
                      "data changed since (files, filters, or data.cache, which drops undecodable rows), so this "
                      "epoch's order is not the one the checkpoint's run followed (rows repeated or skipped); resume "
                      "with the data it was written with to continue it exactly",
                      stacklevel=2)


def record(accelerator, counts: Dict[str, int], carried: Dict[str, tuple], history: List[Dict[str, float]],
           streak: int, train: Optional[TrainConfig] = None, rows: Optional[int] = None) -> Dict:
    """What a checkpoint records of the loop (collective): each process's raw micro-batches read and unlogged
    metrics (their finite values' sums and counts: the log line averages them), the run's totals of COUNTED and of
    the `carried` counters (summed over processes where each keeps its own), the non-finite streak, the engine and
    the optimizer and batch size of `train` (`_check_training`), and the data's usable `rows` (`_check_rows`)."""
    from accelerate.utils import gather_object

    own = {k: counts[k] for k in COUNTED if k in SUMMED}
    own.update({k: getattr(*where) for k, where in carried.items()})
    totals = {k: int(v) for k, v in summed(accelerator, own).items()}
    keys = sorted({k for h in history for k in h})
    finite = {k: [v for v in (h.get(k, 0.0) for h in history) if math.isfinite(v)] for k in keys}
    # the finite values' sums and counts, as `loop._mean_metrics` averages them (a skipped step's NaN loss in a
    # plain sum made the whole window NaN after a resume, and the first line after it averaged fewer steps)
    pending = {"n": len(history), "sums": {k: float(sum(v)) for k, v in finite.items()},
               "counts": {k: len(v) for k, v in finite.items()}}
    return {"raw_batches": gathered(accelerator, counts["raw_batches"]), "engine": engine_name(accelerator),
            "counts": dict(totals, steps_skipped_nonfinite=counts["steps_skipped_nonfinite"]), "streak": streak,
            "unlogged": gather_object([pending]) if accelerator.num_processes > 1 else [pending],
            **({"optimizer": train.optimizer, "batch_size": train.batch_size} if train is not None else {}),
            **({"data_rows": rows} if rows is not None else {})}


def _history(marker: dict, accelerator) -> List[Dict[str, float]]:
    """This process's unlogged metrics as `record` kept them: n entries of their mean (the same sums, so the same
    log line). None from older markers or another number of processes (the first line then averages fewer)."""
    unlogged = marker.get("unlogged")
    if not isinstance(unlogged, list) or len(unlogged) != accelerator.num_processes:
        return []
    own = unlogged[accelerator.process_index]
    counts = own.get("counts") or {k: own["n"] for k in own["sums"]}  # markers before session 36: n each
    means = {k: float(s) / max(1, counts[k]) for k, s in own["sums"].items()}
    return [{k: means[k] if i < counts[k] else math.nan for k in means} for i in range(own["n"])]


def gathered(accelerator, value: int) -> List[int]:
    """Every process's `value`, in process order (collective: every process calls it)."""
    return accelerator.gather(torch.tensor([value], device=accelerator.device)).tolist()


def summed(accelerator, counts: Dict[str, float]) -> Dict[str, float]:
    """`counts` summed over processes (collective; the same keys on every process)."""
    if accelerator.num_processes == 1 or not counts:
        return counts
    local = torch.tensor(list(counts.values()), device=accelerator.device, dtype=torch.float64)
    return dict(zip(counts, accelerator.reduce(local, reduction="sum").tolist()))
