"""Validation galleries: fixed prompts × fixed seeds, the policy beside the base model, a score under each.

The base images are sampled once: with adapters (LoRA, PPD's user branch) by disabling them all, with a full
fine-tune from the frozen reference copy (brought to the VAE's device for the purpose when it is offloaded), or,
without one, from the UNet as it is when the Validator is built. That last case is why the loop must build the
Validator BEFORE it resumes a checkpoint: afterwards the UNet holds the resumed weights, and "base" would show
them instead of the original model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import ConfigError
from .engines import autocast, is_fsdp
from .errors import describe, raise_told
from .adapters import adapters_off, visiting
from .models import build_pipeline
from .sampling import Samples, generate, prompt_major


_NOT_LOADED = object()  # Validator's reward argument when the caller did not load it


class Validator:
    """Galleries of the policy beside the base model. Build it before resuming a checkpoint (module docstring)."""

    def __init__(self, cfg, components, raw_unet, frozen, accelerator, prompts: Sequence[str] = (), base=None,
                 reward=_NOT_LOADED):
        """`base`: a context-manager factory yielding the base UNet (a reference provider's `base_unet`), for
        when `frozen` does not hold the base for the whole run (SePPO loads its snapshots into it). `reward`: what
        `load_validation_reward` gave for these prompts (loaded here if not given)."""
        self.cfg, self.components, self.unet, self.frozen, self.base = cfg, components, raw_unet, frozen, base
        self.accelerator = accelerator
        self.prompts = list(cfg.tracking.validation_prompts or prompts)
        self.flat_prompts, self.seeds = prompt_major(self.prompts, cfg.tracking.validation_seeds, cfg.seed)
        self.users, self.user_tokens = self._gallery_users()
        self.reward = load_validation_reward(cfg, accelerator, self.prompts) if reward is _NOT_LOADED else reward
        # Under FSDP sampling is collective (each block gathers its weights from every process): all sample
        self.samples_here = accelerator.is_main_process or is_fsdp(accelerator)
        self._base: Optional[Samples] = None
        if self.prompts and self.samples_here and frozen is None and cfg.full_finetune:
            self._base = self._sample(self.unet)  # full fine-tune without a reference: before any update

    def _gallery_users(self):
        """PPD: prompt i is drawn for user i mod n of the table (the same user for base and tuned); else none."""
        lookup = getattr(self.components, "users", None)
        if lookup is None or not self.prompts:
            return [None] * len(self.prompts), None
        ids = lookup.table.ids
        users = [ids[i % len(ids)] for i in range(len(self.prompts))]
        k = self.cfg.tracking.validation_seeds
        return users, lookup.table.tokens([u for u in users for _ in range(k)], dtype=torch.float32)

    def _sampling_device(self) -> torch.device:
        return self.components.vae.device

    @contextmanager
    def _base_unet(self):
        if self.base is not None:
            with self.base() as unet, visiting(unet, self._sampling_device()):
                yield unet
        elif not self.cfg.full_finetune:
            with adapters_off(self.unet):
                yield self.unet
        elif self.frozen is None:
            yield None
        else:
            with visiting(self.frozen, self._sampling_device()):
                yield self.frozen

    @torch.no_grad()
    def _sample(self, unet) -> Samples:
        pipe = build_pipeline(self.components, unet=unet)
        pipe.set_progress_bar_config(disable=True)
        tc = self.cfg.tracking
        was_training = unet.training
        unet.eval()
        try:
            # the run's autocast, as in training, rather than only accelerate's wrapper on the prepared UNet's
            # forward (the fp32 UNet beside fp16 text encoders fails without one)
            with autocast(self.accelerator):
                size = self.cfg.raft.resolution if self.cfg.raft.enabled else self.cfg.data.resolution  # as trained
                return generate(pipe, self.flat_prompts, self.seeds, num_inference_steps=tc.sample_steps,
                                guidance_scale=tc.guidance_scale, batch_size=32, user_tokens=self.user_tokens,
                                height=size, width=size, retry_oom=not is_fsdp(self.accelerator),
                                steps_setting="tracking.sample_steps")
        finally:
            unet.train(was_training)

    def _scores(self, samples: Samples) -> List[Optional[float]]:
        if self.reward is None:
            return [None] * len(samples.prompts)
        return self.reward(samples.images, samples.prompts)[0].tolist()

    def sample(self) -> Optional[Samples]:
        """The policy's gallery images (the base's too, the first time); None where this process does not sample
        or without prompts. Collective under FSDP (every process samples)."""
        if not self.prompts or not self.samples_here:
            return None
        if self._base is None:
            with self._base_unet() as base:
                self._base = self._sample(base) if base is not None else None
        return self._sample(self.unet)

    def rows(self, policy: Optional[Samples]) -> Tuple[List[Dict], List[str]]:
        """(gallery rows, column names) from `sample()`'s images, scored, on the main process; ([], []) elsewhere."""
        if policy is None or not self.accelerator.is_main_process:
            return [], []
        return self._rows(policy), self._columns()

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
            label = prompt if self.users[i] is None else f"{prompt} · user {self.users[i]}"
            rows.append({"prompt": label, "images": row_images, "captions": caps})
        return rows


def load_validation_reward(cfg, accelerator, prompts: Sequence[str]):
    """tracking.validation_reward (None when unset) on the main process only, which alone scores galleries, on its
    device (a reward's default device, cuda, is GPU 0 for every process); None elsewhere. Checked against the
    gallery prompts: a reward that cannot read them is a ConfigError now rather than a traceback at the first
    gallery. Its setup errors stop every process alike (collective with several)."""
    from reward_models.options import reward_on

    name, reward, error = cfg.tracking.validation_reward, None, None
    if not name:
        return None
    if accelerator.is_main_process:
        try:
            reward = reward_on(name, dict(cfg.tracking.validation_reward_options), str(accelerator.device))
            _check_reward_reads_prompts(cfg, reward, prompts)
        except Exception as err:  # raised below, once the others know
            error = err
    told = describe(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        told = broadcast_object_list([told])[0]
    if error is not None:
        raise error
    raise_told(told, "the main process could not load tracking.validation_reward")
    return reward


def check_gallery_direction(cfg) -> None:
    """decomposed-clip under the gallery, before the model loads: without a common direction it refused to load
    (after the model had); `direction=batch` takes v from the gallery's prompts (each set scored in one call), and
    one prompt decomposes nothing. Unset validation prompts are the data's first captions, not known yet."""
    import inspect

    from reward_models.decomposed_clip import DecomposedClip

    tc = cfg.tracking
    if tc.validation_reward != "decomposed-clip":
        return
    options = dict(tc.validation_reward_options)
    direction, fit = options.get("direction"), options.get("fit_prompts")
    omega = options.get("omega", inspect.signature(DecomposedClip).parameters["omega"].default)
    if direction is not None and fit is not None:
        raise ConfigError("tracking.validation_reward_options: give direction or fit_prompts, not both")
    if direction is None and fit is None and float(omega) != 1.0:
        raise ConfigError("tracking.validation_reward=decomposed-clip needs its common direction: set "
                          "tracking.validation_reward_options.direction=FILE (a LongAlign run's "
                          "reward_direction.safetensors) or fit_prompts=PROMPTS (or omega=1: plain CLIP)")
    if direction == "batch" and tc.validation_prompts and len(set(tc.validation_prompts)) < 2:
        raise ConfigError("tracking.validation_reward_options.direction=batch with one tracking.validation_prompts "
                          "prompt: the gallery is scored against its prompts' mean text, and one prompt decomposes "
                          "nothing (v = its own t); give two or more validation prompts, or direction=FILE or "
                          "fit_prompts=PROMPTS")


def _check_reward_reads_prompts(cfg, reward, prompts: Sequence[str]) -> None:
    """toy-judge reads only toy captions: say which prompts it refuses and how to choose others."""
    from reward_models.base import PromptsRejected

    try:
        reward.check_prompts(list(prompts))
    except PromptsRejected as err:
        given = "tracking.validation_prompts" if cfg.tracking.validation_prompts else \
            "the first training captions (tracking.validation_prompts is empty)"
        raise ConfigError(
            f"tracking.validation_reward = {cfg.tracking.validation_reward!r} cannot score the validation "
            f"prompts, {given}: {err}. Set tracking.validation_prompts to prompts it reads, or choose another "
            "tracking.validation_reward (null: no score under the images)") from None
