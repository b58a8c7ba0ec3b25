"""Reward fine-tuning by back-propagation through the sampling chain: LongAlign's stage 2 (Liu et al. 2024,
"Improving Long-Text Alignment for Text-to-Image Diffusion Models", arXiv 2410.11817; official code
github.com/luping-liu/LongAlign, `unet_reward.py`), and with other settings DRaFT-K / AlignProp / ReFL-like runs.

Prompts in; per prompt one image x_0 = D(rollout(x_T)) from the policy's DDIM chain (`t2i_align.rollout`: CFG
against the empty prompt, gradients only on the chosen steps, their UNet input detached and checkpointed), then

    loss = -loss_scale · mean_b r(x_0^b, p_b)

with r any differentiable reward of the registry. LongAlign's reward is Denscore decomposed and reweighted,
r = S_ω = t⊥·x + ω η (v·x) (`reward_models/decomposed_clip.py`), and its loss 0.5·(1 - mean S_ω) - 0.09·(1 - ω):
the same gradient as loss_scale = 0.5 here (the constants only shift the logged value). We log -loss_scale ·
mean r as `loss`, and r's parts: `reward` (what is optimised), `reward_total` (the raw S), `reward_relevant`
(t⊥·x), `reward_irrelevant` (η v·x) and `reward_eta` for decomposed-clip, each reward's own info otherwise.

Where we differ from the official code, on purpose:
- the common direction v is fitted ONCE from a prompt set (default: the training prompts, at most
  `fit_max_prompts` of them, 10,000, a seeded sample) and saved as
  <output_dir>/reward_direction.safetensors, which every process and every resume loads; the code recomputes it
  per step from the all-gathered batch, so a score there depends on the batch and on the number of GPUs;
- the reward sees the whole decoded image, resized and centre-cropped (`reward_models`: bicubic, as the reward's
  own preprocessing), not the code's RandomCrop(504) ("for blocky blur"), an augmentation we leave out, then a
  bilinear Resize((224, 224));
- the gradient steps are drawn from the global RNG (restored on resume), per process.
No reference model: the reward alone is the objective, as in LongAlign. Ours, optional (`kl_weight` > 0): DPOK's
KL regulariser (Fan et al. 2023, arXiv 2305.16381, §4.2), whose per-step KL between two Gaussian step policies
of equal variance is c_t‖ε_θ − ε_ref‖²; we add kl_weight · mean over the gradient steps of the mean squared
difference of the guided predictions, with c_t = 1 and DDIM's η = 0 chain (deterministic: a proxy, not a KL),
against the model the run started from, so the policy stays near stage 1 where the reward stops being right.
"""
from __future__ import annotations

import functools
import math
import os
import random
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from t2i_align.config import ConfigError, ObjectiveConfig
from t2i_align.diffusion import latent_scheduler
from t2i_align.files import plain_modes
from t2i_align.objectives.base import Denoiser, Metrics, Objective, PromptBatch, metrics_to_floats

DIRECTION_FILE = "reward_direction.safetensors"
"""Where a run keeps the decomposed-clip common direction it fitted (in output_dir)."""


def sampling_scheduler(scheduler, timestep_spacing: Optional[str]):
    """A DDIMScheduler with the training scheduler's noise schedule and, if given, another timestep spacing
    ("trailing": LongAlign's 999 … 19); `rollout` builds its chain from this one's config."""
    from diffusers import DDIMScheduler

    extra = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    return latent_scheduler(DDIMScheduler, scheduler.config, **extra)


def check_differentiable(reward: str) -> None:
    """ConfigError for a reward whose score carries no gradient (checked before a run loads, and here)."""
    from reward_models.base import differentiable_rewards

    if reward not in differentiable_rewards():
        raise ConfigError(f"reward_backprop.reward = {reward!r} is not a differentiable reward (its score "
                          "carries no gradient to the image); choose one of " + ", ".join(differentiable_rewards()))


def check_direction(cfg) -> None:
    """decomposed-clip's direction options, before the model loads (and in `build_reward`): `direction=batch`
    takes v from each process's micro-batch, train.batch_size prompts, and one prompt decomposes nothing."""
    rc = cfg.reward_backprop
    options = dict(rc.reward_options)
    if rc.reward != "decomposed-clip" or options.get("direction") is None:
        return
    if options.get("fit_prompts") is not None:  # the reward refused it once built
        raise ConfigError("reward_backprop.reward_options: give direction or fit_prompts, not both")
    if options["direction"] == "batch" and cfg.train.batch_size < 2:
        raise ConfigError("reward_backprop.reward_options.direction=batch with train.batch_size=1: each process "
                          "scores its micro-batch against its prompts' mean text, and one prompt decomposes nothing "
                          "(v = its own t); set train.batch_size >= 2, or leave direction unset (fitted once on the "
                          "training prompts)")


def build_reward(ctx, rc, fit_spec: str):
    """The run's reward, on this process's device; decomposed-clip with its common direction fixed for the run
    (see the module docstring). ConfigError for a reward that is not differentiable."""
    check_differentiable(rc.reward)
    options = dict(rc.reward_options)
    if options.get("direction", "") is None:  # `direction: null` is "unset": fitted once, as when left out
        del options["direction"]
    check_direction(ctx.cfg)
    if rc.reward != "decomposed-clip" or options.get("direction") is not None:
        return ctx.reward(rc.reward, **options)
    return _decomposed_with_run_direction(ctx, rc, options, fit_spec)


def _decomposed_with_run_direction(ctx, rc, options: dict, fit_spec: str):
    """Main process: fit v on the fit prompts and save it (unless the run folder has it: a resume); every process
    then loads the file, so all score with the very same float32 vector."""
    from reward_models.decomposed_clip import prompts_digest

    from t2i_align.engines import on_main
    from t2i_align.prompts import read_prompts

    fit = options.pop("fit_prompts", None) or fit_spec
    every = read_prompts(fit, "reward_backprop.reward_options.fit_prompts") if isinstance(fit, str) else list(fit)
    prompts = every  # a large set: a sample, the same on every process and resume
    if 0 < rc.fit_max_prompts < len(every):
        prompts = random.Random(ctx.cfg.seed).sample(every, rc.fit_max_prompts)
    path = Path(ctx.cfg.output_dir) / DIRECTION_FILE
    def fit_direction():
        if path.exists():  # a resume: the run's own direction
            return None
        fitted = ctx.reward(rc.reward, **options, fit_prompts=prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fitted.save_direction(tmp)
        plain_modes(tmp)
        os.replace(tmp, path)  # complete or absent
        return fitted

    # every process stops if the main one cannot fit (a missing checkpoint), rather than wait for its file
    reward = on_main(ctx.accelerator, fit_direction, "the main process could not fit the reward's common direction")
    if reward is None:
        reward = ctx.reward(rc.reward, **options, direction=str(path))
    else:
        reward.load_direction(path)  # the file's vector, as the other processes and a resume have it
    fitted_on = reward.direction_metadata.get("prompts_sha256")
    # every prompt: a run begun before fit_max_prompts existed, whose direction a resume keeps
    accepted = {prompts_digest(prompts), prompts_digest(every)}  # a file without the digest is no run's own
    if fitted_on not in accepted:
        named = repr(fit) if isinstance(fit, str) else f"the {len(every)} listed prompts"
        raise ConfigError(f"{path} holds a common direction fitted on other prompts than {named} (at most "
                          f"reward_backprop.fit_max_prompts={rc.fit_max_prompts} of them, drawn with seed "
                          f"{ctx.cfg.seed}); resume with the run's own settings, delete it to refit, or train into a "
                          "new output_dir")
    return reward


class RewardBackprop(Objective):
    """Prompts in (batch_kind "prompts"); the loss of the module docstring; a reference only with kl_weight."""

    needs_reference = False
    batch_kind = "prompts"
    reward = None
    sampler = None

    def configure(self, cfg) -> "RewardBackprop":
        self.needs_reference = cfg.reward_backprop.kl_weight > 0
        return self

    def setup(self, ctx) -> None:
        super().setup(ctx)
        rc = ctx.cfg.reward_backprop
        self.sampler = sampling_scheduler(ctx.components.scheduler, rc.timestep_spacing)
        self.reward = build_reward(ctx, rc, ctx.cfg.data.path)

    def generate(self, policy: Denoiser, batch: PromptBatch, generator: Optional[torch.Generator] = None,
                 grad: bool = True, grad_step_hook=None) -> torch.Tensor:
        """Decoded images in [0, 1] for the batch's prompts, with gradients through the chosen steps when `grad`
        (with grad=False: the same chain and decode, nothing kept for backward); `grad_step_hook` as rollout's."""
        from t2i_align.rollout import choose_grad_steps, initial_latents, rollout

        ctx, rc = self.ctx, self.ctx.cfg.reward_backprop
        device = batch.embeds.prompt_embeds.device
        noise = initial_latents((len(batch), *ctx.latent_shape()), generator, self.sampler, device=device)
        steps = choose_grad_steps(rc.grad_mode, rc.num_steps, rc.grad_k, generator) if grad else []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            latents = rollout(policy, batch.embeds, ctx.empty_embeds(1), self.sampler, noise,
                              num_steps=rc.num_steps, guidance_scale=rc.guidance_scale, grad_steps=steps,
                              detach_input=rc.detach_input, checkpoint=rc.checkpoint, time_ids=batch.time_ids,
                              eta=rc.eta, generator=generator, x0_prediction=rc.x0_prediction,
                              grad_step_hook=grad_step_hook)
            images = ctx.decode_latents(latents, grad=grad, checkpoint=rc.decode_checkpoint)
        return images / 2 + 0.5

    def compute_loss(self, policy: Denoiser, reference: Optional[Denoiser], batch: PromptBatch,
                     scheduler: object, cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, Metrics]:
        self.check_reference(policy, reference)
        if not isinstance(batch, PromptBatch):
            raise TypeError(f"reward_backprop needs a PromptBatch (data.kind=prompts), got {type(batch).__name__}")
        rc = self.ctx.cfg.reward_backprop
        kl: list = []
        hook = None if reference is None else functools.partial(_kl_term, reference=reference, out=kl)
        scores, info = self.reward(self.generate(policy, batch, generator, grad_step_hook=hook), batch.captions)
        loss = -rc.loss_scale * scores.float().mean()
        values = {"reward": scores.float().mean()}
        if reference is not None and kl:
            values["kl"] = torch.stack(kl).mean()
            loss = loss + rc.kl_weight * values["kl"]
        values["loss"] = loss
        return loss, {**metrics_to_floats(values), **reward_info_means(info, len(batch))}


def _kl_term(eps: torch.Tensor, predict, reference: Denoiser, out: list) -> None:
    """Append ‖ε_θ − ε_ref‖² (mean over elements) at one gradient step; the reference under no_grad."""
    with torch.no_grad():
        ref = predict(reference)
    out.append((eps.float() - ref.float()).pow(2).mean())


def reward_info_means(info: dict, n: int) -> Dict[str, float]:
    """`reward_<key>`: the batch mean of every per-image number list of a reward's info (decomposed-clip: total,
    relevant, irrelevant, weighted, eta), plus its `truncated` count (prompts its text encoder cut). Python
    floats, not tensors: CPU tensors stacked with the metrics on a GPU would fail (found by reading)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) for v in value):
            out[f"reward_{key}"] = math.fsum(value) / n
        elif key == "truncated" and isinstance(value, int):
            out["reward_truncated"] = float(value)
    return out
