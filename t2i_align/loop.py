"""THE training loop: one loop for every objective (accelerate; one or many processes).

Per optimizer step: `grad_accum` micro-batches -> objective.compute_loss -> backward (gradient sync only on the
last micro-batch) -> gradient norm (clipped if asked) -> a non-finite norm skips the step -> optimizer and LR
schedule step. Metrics go to metrics.jsonl / W&B every `log_every` steps, galleries every `validate_every`,
checkpoints every `checkpoint_every`; `final/` is exported at the end. The loop never branches on the method.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from . import diffusion
from .batches import BATCH_BUILDERS, make_denoiser
from .build import Built, build, check_before_loading, check_gallery_weights
from .checkpoints import export_final, resolve_resume_everywhere, save_checkpoint, save_only_trainable
from .config import Config, config_to_dict
from .engine_checks import check_launcher_precision, configure_engine
from .engines import (autocast, check_shared_output, deepspeed_logs_to_stderr, engine_name, is_fsdp, loss_scaled,
                      on_every, on_main, say, whole_unet)
from .errors import UserError
from .models import build_pipeline
from .objectives import get_objective
from .objectives.context import ObjectiveContext
from .resume import (SUMMED, Restored, check_checkpoint_fits, check_resume, claim_output, record, restore,
                     summed)
from .run_dir import take_output_lock
from .tracking import Tracker, continued_run_id
from .validation import Validator, load_validation_reward


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    final: Path
    """The `final/` export (LoRA weights file folder or full pipeline folder)."""
    unet: torch.nn.Module
    """This process's trained UNet (unwrapped; under FSDP it holds this process's shards), for in-process use."""


def _mean_metrics(accelerator, history: List[Dict[str, float]]) -> Dict[str, float]:
    """Average each metric over the logged micro-batches (its finite values: one skipped non-finite step, counted
    in steps_skipped_nonfinite, made the whole window's metrics NaN) and over processes."""
    keys = sorted({k for h in history for k in h})
    if not keys:  # the same on every process (one objective)
        return {}
    finite = [[v for v in (h.get(k, 0.0) for h in history) if math.isfinite(v)] for k in keys]
    local = torch.tensor([sum(f) for f in finite] + [len(f) for f in finite], device=accelerator.device,
                         dtype=torch.float64)
    sums, counts = accelerator.reduce(local, reduction="sum").split(len(keys))  # over every process's micro-batches
    return dict(zip(keys, (sums / counts).tolist()))  # 0 / 0: NaN where no value was finite


def _next_batch(batches: Iterator, builder, components, device, counts: Dict[str, int], per_epoch: int, rows: int):
    """The next usable micro-batch; a batch whose `rows` rows were all corrupt is counted and replaced by the next,
    so every process runs the same number of forward/backward passes. `counts["raw_batches"]` counts every raw batch
    read: a resumed run skips exactly that many (the checkpoint records each process's count: they differ when one
    process replaced a batch and another did not). A whole epoch (`per_epoch` batches) unusable stops the run."""
    for _ in itertools.count(1) if per_epoch <= 0 else range(per_epoch + 1):
        raw = next(batches)
        counts["raw_batches"] += 1
        if raw is None:
            counts["data_batches_skipped"] += 1
            counts["data_rows_skipped"] += rows
            continue
        counts["data_rows_skipped"] += int(raw.get("skipped", 0))
        return builder(components, raw, device)
    raise UserError(f"no usable row in {per_epoch + 1} batches in a row, a whole epoch of this process's data: every "
                    "image failed to decode. Check data.path")


def _optimizer_step(accelerator, unet, optimizer, lr_sched, params, max_grad_norm: float) -> float:
    """Clip (or just measure) the gradient norm and step; a non-finite norm skips the update. Returns the norm.

    With fp16 a GradScaler is in play: it must see the overflowing step (it skips it itself and lowers its
    scale), so `optimizer.step()` is still called then; otherwise the scale would never come down."""
    norm = float(accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if math.isfinite(norm) or accelerator.scaler is not None:
        optimizer.step()
        if math.isfinite(norm):
            lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _counts_as_failure(accelerator, norm: float, step_metrics: List[Dict[str, float]]) -> bool:
    """A skipped step that should count towards stopping: always without fp16 loss scaling; with it, only when
    the loss itself was non-finite (gradient overflows while the scaler calibrates are expected)."""
    if math.isfinite(norm):  # the norm is global: every process takes the same branch
        return False
    if not loss_scaled(accelerator):
        return True
    # Every process must agree, or one would stop alone while the others wait for it
    return not _everywhere(accelerator, all(math.isfinite(m.get("loss", 0.0)) for m in step_metrics))


def _everywhere(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on every process (collective when there are several)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return int(total.item()) == accelerator.num_processes


def train(cfg: Config) -> TrainResult:
    """Train as `cfg` says; returns the `final/` export folder and the trained UNet."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # dynamo_backend None: accelerate reads `accelerate launch --dynamo_backend` (off unless given there)
    check_launcher_precision(cfg)
    deepspeed_logs_to_stderr()
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout))
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              dynamo_backend="inductor" if cfg.train.compile else None, kwargs_handlers=[timeout])
    objective = get_objective(cfg.objective.name).configure(cfg)
    configure_engine(accelerator, cfg, objective.runs_sharded)
    on_every(accelerator, lambda: check_before_loading(cfg, objective.batch_kind, gallery_weights=False, devices=True),
             "another process found a mistake in the settings (a file missing on its machine?)")
    check_gallery_weights(accelerator, cfg)
    out = Path(cfg.output_dir)
    check_shared_output(accelerator, out)
    lock = on_main(accelerator, lambda: take_output_lock(out), "the main process found output_dir in use")
    try:
        return _train_in(cfg, accelerator, objective, out)
    finally:
        if lock is not None:
            os.close(lock)


def _train_in(cfg: Config, accelerator, objective, out: Path) -> TrainResult:
    """`train` once the engine and output_dir are checked and output_dir is this run's to use."""
    resume = resolve_resume_everywhere(accelerator, out, cfg.train.resume)
    if resume is not None:  # on every process together: a folder one machine lacks stops them all
        on_every(accelerator, lambda: check_resume(
            resume, engine_name(accelerator), accelerator.num_processes, cfg.train.max_steps, out,
            warn=accelerator.is_main_process, train=cfg.train, method=(cfg.objective.name, cfg.raft.enabled),
            settings=config_to_dict(cfg)), "another process cannot resume from the checkpoint")
    m = build(cfg, accelerator, objective)
    if resume is not None:  # other LoRA / PPD settings failed in the load, the earlier run already set aside
        on_every(accelerator, lambda: check_checkpoint_fits(resume, m.raw_unet, not cfg.full_finetune),
                 "another process found that the checkpoint does not fit this run")
    prompts = list(cfg.tracking.validation_prompts or m.source.sample_captions(4))
    reward = load_validation_reward(cfg, accelerator, prompts)  # refuses prompts it cannot read
    tracker = on_main(accelerator, lambda: _start_tracking(cfg, out, resume),
                      "the main process could not start tracking")
    tracker = tracker or Tracker(out, enabled=False)
    # Every setting checked: only now an earlier run's files are set aside (before SePPO's pool and LongAlign's
    # direction look for theirs) and this run's config written
    on_main(accelerator, lambda: claim_output(cfg, out, resume, functools.partial(say, accelerator), tracker),
            "the main process could not set the earlier run's files aside")
    ctx = ObjectiveContext(m.components, accelerator, cfg, m.raw_unet, not cfg.full_finetune, m.frozen)
    objective.setup(ctx)
    provider = objective.reference_provider(ctx)  # before a resume: its initial snapshot is the initial model
    if not cfg.full_finetune:
        save_only_trainable(accelerator)
    # Before a resume: without a reference, the gallery's "base" column is sampled from the UNet as it is now.
    validator = Validator(cfg, m.components, m.raw_unet, m.frozen, accelerator, prompts,
                          base=None if provider is None else provider.base_unet, reward=reward)
    parts = (provider, m.source, m.components.users)  # what each keeps beyond weights: saved, and resumed
    restored = restore(cfg, accelerator, m, parts, tracker, resume, _carried(m.components))
    state = _RunState(objective, provider, m.source, tracker, validator, restored, parts)
    _run(cfg, accelerator, m.components, state, m.unet, m.optimizer, m.lr_sched, m.params)
    return _finish(cfg, accelerator, m, validator, tracker)


def _finish(cfg: Config, accelerator, m: Built, validator: Validator, tracker: Tracker) -> TrainResult:
    """The export, the last gallery and the end of tracking, after the last step."""
    accelerator.wait_for_everyone()
    whole = whole_unet(accelerator, m.raw_unet)  # collective under FSDP
    out, users = Path(cfg.output_dir), m.components.users
    final = on_main(accelerator, lambda: export_final(
        build_pipeline(m.components, unet=whole), whole, not cfg.full_finetune, out,
        user_table=None if users is None else users.table, base_model=cfg.model.pretrained,
        step=cfg.train.max_steps, vae=cfg.model.vae, vae_dir=m.components.vae_dir),
        "the main process could not export")
    _show_gallery(accelerator, validator, tracker, cfg.train.max_steps)
    on_main(accelerator, tracker.finish, "the main process could not finish tracking (W&B)")
    accelerator.wait_for_everyone()
    return TrainResult(final or out / "final", m.raw_unet)


def _start_tracking(cfg: Config, out: Path, resume: Optional[Path]) -> Tracker:
    """Main process: metrics.jsonl and W&B (which may refuse to start; it writes only in its own wandb/ folder)."""
    return Tracker(out, cfg.tracking.wandb, cfg.tracking.project, cfg.tracking.run_name, config_to_dict(cfg),
                   run_id=continued_run_id(out, resume))


@dataclass
class _RunState:
    """What `_run` needs beyond the accelerate-prepared objects."""

    objective: object
    provider: object
    source: object
    tracker: Tracker
    validator: Validator
    restored: Restored
    """The step, counts, unlogged metrics and non-finite streak the run starts from."""
    parts: tuple = ()


def _run(cfg, accelerator, components, st: _RunState, unet, optimizer, lr_sched, params) -> None:
    tc = cfg.train
    start, counts = st.restored.step, dict(st.restored.counts)
    batches = st.source.micro_batches(counts["raw_batches"])
    builder = BATCH_BUILDERS[st.objective.batch_kind]
    inner = getattr(st.source, "source", st.source)  # PPD filters another source's batches
    per_epoch = getattr(inner, "batches_per_epoch", 0)  # 0: sources that never yield unusable batches
    policy = make_denoiser(unet, components)
    # The objectives' noise schedule; sampling (galleries, SePPO's and LongAlign's chains) keeps the folder's
    schedule = diffusion.zero_terminal_snr(components.scheduler) if cfg.objective.zero_terminal_snr \
        else components.scheduler
    history, streak = list(st.restored.history), st.restored.streak
    if accelerator.device.type == "cuda":  # gpu_mem_peak_gb: the steps' peak, not the model load's or cache build's
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    last_log = (time.perf_counter(), start)  # for sec_per_step: (when, step) of the previous log
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps,
               disable=not accelerator.is_main_process, desc="train")
    for step in bar:
        reference = None
        if st.provider is not None:
            st.provider.begin_step(step)
            reference = st.provider.denoiser()
        for micro in range(tc.grad_accum):
            batch = _next_batch(batches, builder, components, accelerator.device, counts, per_epoch, tc.batch_size)
            sync = micro == tc.grad_accum - 1
            # DeepSpeed steps its engine inside backward, on the last micro-batch only; elsewhere the flag only
            # gates accelerate's optimizer and scheduler steps, which the loop takes after the last one
            accelerator.sync_gradients = sync
            # the backward inside no_sync (FSDP2 reads its flag there), but not under FSDP: unsharded gradients held
            # across micro-batches would cost GBs (SDXL); each micro-batch's are reduce-scattered as they come
            with nullcontext() if sync or is_fsdp(accelerator) else accelerator.no_sync(unet):
                with autocast(accelerator):
                    loss, metrics = st.objective.compute_loss(policy, reference, batch, schedule, cfg.objective,
                                                              None)
                accelerator.backward(loss / tc.grad_accum)
            history.append(metrics)
        lr = lr_sched.get_last_lr()[0]  # this step's rate (read after the schedule's step, the log showed the next's)
        norm = _optimizer_step(accelerator, unet, optimizer, lr_sched, params, tc.max_grad_norm)
        streak = streak + 1 if _counts_as_failure(accelerator, norm, history[-tc.grad_accum:]) else 0
        counts["steps_skipped_nonfinite"] += int(not math.isfinite(norm))
        if streak >= tc.max_nonfinite_steps:
            raise NonFiniteError(f"{streak} consecutive steps had a non-finite loss or gradient (last at step "
                                 f"{step + 1}); lower train.learning_rate, use mixed_precision=bf16/no, or check "
                                 "the data. Checkpoints written so far are intact.")
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            last_log = _log(accelerator, st, history, counts, components, lr, norm, done, bar, last_log)
            history = []
        if st.provider is not None:
            st.provider.after_step(done, applied=math.isfinite(norm) and lr > 0)  # warmup's rate 0 moves nothing
        # and at the last step, so that a run can be continued (a larger max_steps) from where it ended
        if tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == tc.max_steps):
            save_checkpoint(accelerator, cfg.output_dir, done, tc.keep_checkpoints, params,
                            marker=record(accelerator, counts, _carried(components), history, streak, tc,
                                          rows=getattr(inner, "data_rows", None)),
                            save_extra=lambda folder: _save_extras(st, folder))
            if st.provider is not None:
                st.provider.after_checkpoint()
        if cfg.tracking.validate_every and done % cfg.tracking.validate_every == 0 and done < tc.max_steps:
            _show_gallery(accelerator, st.validator, st.tracker, done)


def _show_gallery(accelerator, validator: Validator, tracker: Tracker, step: int) -> None:
    """Collective: the gallery sampled (by the main process, or by all under FSDP), scored and logged by the main
    process; a failure there (a reward, W&B) stops every process instead of leaving them waiting for it. FSDP's
    sampling is itself collective: it runs first, on every process, outside `on_main` (a process failing in it
    would otherwise wait to tell the others while they wait in its next all-gather)."""
    def show(policy) -> None:
        rows, columns = validator.rows(policy)
        if rows:
            tracker.log_gallery(rows, step, columns, name="gallery")

    context = "the main process could not write the gallery"
    if is_fsdp(accelerator):
        sampled = validator.sample()
        on_main(accelerator, lambda: show(sampled), context)
    else:
        on_main(accelerator, lambda: show(validator.sample()), context)


def _carried(components) -> Dict[str, tuple]:
    """The logged counters kept by parts of the run, as (object, attribute), restored on a resume like COUNTED:
    the text encoders' truncated prompts."""
    return {"prompts_truncated": (components.truncation, "prompts_truncated")}


def _save_extras(st: _RunState, folder: Path) -> None:
    for part in st.parts:
        if hasattr(part, "save"):
            part.save(folder)


def _log(accelerator, st: _RunState, history, counts, components, lr, norm, done, bar, last_log):
    """Write the metrics; returns (now, done) for the next sec_per_step. sec_per_step is wall time per optimizer
    step since the previous log, checkpoints and galleries included, read after `_mean_metrics` has synchronised
    with the device, so queued GPU work is counted where it ran."""
    logged = _mean_metrics(accelerator, history)
    now = time.perf_counter()
    logged["sec_per_step"] = (now - last_log[0]) / (done - last_log[1])
    logged.update(st.source.metrics())
    if st.provider is not None:
        logged.update(st.provider.metrics())
    logged.update({k: v for k, v in counts.items() if k != "raw_batches"}, lr=lr,
                  grad_norm=norm, prompts_truncated=components.truncation.prompts_truncated)
    logged.update(summed(accelerator, {k: logged[k] for k in SUMMED if k in logged}))
    if accelerator.device.type == "cuda":  # the main process's, since the first step (galleries included)
        logged["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    on_main(accelerator, lambda: st.tracker.log(logged, step=done), "the main process could not log metrics")
    bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
    return now, done
