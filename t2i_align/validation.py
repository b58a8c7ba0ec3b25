"""Validation galleries: fixed prompts × fixed seeds, the policy beside the base model, a score under each.

The base images are sampled once: with LoRA by disabling the adapters, with a full fine-tune from the frozen
reference copy, or, without one, from the UNet before its first update.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .models import build_pipeline, lora_reference
from .sampling import Samples, generate, prompt_major


class Validator:
    def __init__(self, cfg, components, raw_unet, frozen, accelerator, prompts: Sequence[str] = ()):
        self.cfg, self.components, self.unet, self.frozen = cfg, components, raw_unet, frozen
        self.accelerator = accelerator
        self.prompts = list(cfg.tracking.validation_prompts or prompts)
        self.flat_prompts, self.seeds = prompt_major(self.prompts, cfg.tracking.validation_seeds, cfg.seed)
        self.reward = None
        if cfg.tracking.validation_reward:
            from reward_models import get_reward

            self.reward = get_reward(cfg.tracking.validation_reward)
        self._base: Optional[Samples] = None
        if self.prompts and accelerator.is_main_process and frozen is None and not cfg.lora.enabled:
            self._base = self._sample(self.unet)  # full fine-tune without a reference: before any update

    @contextmanager
    def _base_unet(self):
        if self.cfg.lora.enabled:
            with lora_reference(self.unet):
                yield self.unet
        else:
            yield self.frozen

    @torch.no_grad()
    def _sample(self, unet) -> Samples:
        pipe = build_pipeline(self.components, unet=unet)
        pipe.set_progress_bar_config(disable=True)
        tc = self.cfg.tracking
        was_training = unet.training
        unet.eval()
        try:
            return generate(pipe, self.flat_prompts, self.seeds, num_inference_steps=tc.sample_steps,
                            guidance_scale=tc.guidance_scale, batch_size=32)
        finally:
            unet.train(was_training)

    def _scores(self, samples: Samples) -> List[Optional[float]]:
        if self.reward is None:
            return [None] * len(samples.prompts)
        return self.reward(samples.images, samples.prompts)[0].tolist()

    def gallery(self, step: int) -> Tuple[List[Dict], int, List[str]]:
        """(rows, step, column names) on the main process; ([], step, []) elsewhere or without prompts."""
        if not self.prompts or not self.accelerator.is_main_process:
            return [], step, []
        if self._base is None:
            with self._base_unet() as base:
                self._base = self._sample(base) if base is not None else None
        policy = self._sample(self.unet)
        return self._rows(policy), step, self._columns()

    def _columns(self) -> List[str]:
        k = self.cfg.tracking.validation_seeds
        cols = [f"tuned · seed {i}" for i in range(k)]
        return ([f"base · seed {i}" for i in range(k)] + cols) if self._base is not None else cols

    def _rows(self, policy: Samples) -> List[Dict]:
        from .gallery import to_uint8

        k = self.cfg.tracking.validation_seeds
        sets = ([self._base] if self._base is not None else []) + [policy]
        images = [to_uint8(s.images) for s in sets]
        scores = [self._scores(s) for s in sets]
        rows = []
        for i, prompt in enumerate(self.prompts):
            sl = slice(i * k, (i + 1) * k)
            row_images = [im for imgs in images for im in imgs[sl]]
            caps = [("" if sc is None else f"{self.cfg.tracking.validation_reward} {sc:.2f}")
                    for scs in scores for sc in scs[sl]]
            rows.append({"prompt": prompt, "images": row_images, "captions": caps})
        return rows
