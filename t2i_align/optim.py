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


def align_lr_schedule(lr_sched, old_processes: int, new_processes: int) -> None:
    """After a resume on another number of processes: the restored schedule counted its steps in the old run's
    units (see `make_lr_scheduler`: `old_processes` per optimizer step taken; steps skipped as non-finite took
    none), so from 8 processes to 1 its linear decay had already ended and the rate stayed 0. Rescaled to the new
    units. The learning rate itself is the checkpoint's (with train.scale_lr, scaled for the old count)."""
    if old_processes == new_processes:
        return
    inner = getattr(lr_sched, "scheduler", lr_sched)  # accelerate's wrapper
    if not hasattr(inner, "lr_lambdas"):  # diffusers' schedules are all LambdaLR
        raise ConfigError(f"the checkpoint was written by {old_processes} processes, this run has {new_processes}, "
                          "and its learning-rate schedule cannot be moved to the new count: resume with "
                          f"{old_processes} processes")
    inner.last_epoch = inner.last_epoch // old_processes * new_processes
    lrs = [base * lam(inner.last_epoch) for lam, base in zip(inner.lr_lambdas, inner.base_lrs)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs
