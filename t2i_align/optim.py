"""Optimizers and learning-rate schedules for the training loop."""
from __future__ import annotations

from typing import List

import torch

from .config import ConfigError, TrainConfig


def effective_lr(cfg: TrainConfig, num_processes: int) -> float:
    """`scale_lr` multiplies by pairs per optimizer step, as the official Diffusion-DPO launchers do
    (1e-8 × 1 pair × 128 accumulation × 16 GPUs = 2.048e-5)."""
    if cfg.scale_lr:
        return cfg.learning_rate * cfg.batch_size * cfg.grad_accum * num_processes
    return cfg.learning_rate


def make_optimizer(params: List[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("no trainable parameters: check lora.enabled / lora.target_modules")
    if cfg.optimizer in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                 eps=cfg.adam_epsilon, fused=cfg.optimizer == "adamw_fused" or None)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The official SDXL recipe: fixed LR (no relative step, no parameter scaling), update clipping at 1.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ModuleNotFoundError as err:  # not installed (an install that fails to load keeps its own error)
            if err.name != "bitsandbytes":
                raise
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install 't2i-align[8bit]' "
                              "(GPU only), or use train.optimizer=adamw") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    raise ConfigError(f"unknown train.optimizer={cfg.optimizer!r}; use adamw, adamw_fused, adafactor or adamw8bit")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, num_processes: int = 1):
    """A diffusers schedule with warmup and total given in optimizer steps.

    Built in the units accelerate steps it in: once `accelerator.prepare` wraps it, `AcceleratedScheduler.step()`
    advances it `num_processes` times per optimizer step (split_batches=False), so warmup and total are
    multiplied by `num_processes`, as diffusers' training scripts do. Unprepared, pass num_processes=1."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                             num_training_steps=cfg.max_steps * num_processes)
    except ValueError as err:
        raise ConfigError(f"train.lr_scheduler={cfg.lr_scheduler!r}: {err}") from err


def align_lr_schedule(lr_sched, step: int, num_processes: int) -> None:
    """After a resume: put the schedule at `step` in this run's units. A schedule restored from a run on another
    number of processes counted `step` x that number (see `make_lr_scheduler`): from 8 processes to 1 its linear
    decay had already ended, and the learning rate stayed 0. The learning rate itself is the checkpoint's."""
    inner = getattr(lr_sched, "scheduler", lr_sched)  # accelerate's wrapper
    want = step * num_processes
    if inner.last_epoch == want:
        return
    if not hasattr(inner, "lr_lambdas"):  # diffusers' schedules are all LambdaLR
        raise ConfigError(f"the checkpoint's learning-rate schedule is at {inner.last_epoch}, not {want}; resume "
                          "with the number of processes that wrote it")
    inner.last_epoch = want
    lrs = [base * lam(want) for lam, base in zip(inner.lr_lambdas, inner.base_lrs)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs
