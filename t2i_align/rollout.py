"""One differentiable DDIM sampling chain for every reward-gradient method, over denoiser closures.

Reward-gradient methods differ only in which steps of the chain carry gradients and what is cut:

- ReFL / ImageReward (Xu et al. 2023, arXiv 2304.05977): gradients through one late step (`"last"`, k = 1 is the
  closest; ReFL also stops the chain at a random late step and scores that step's x0-prediction, not done here).
- DRaFT-K (Clark et al. 2023, arXiv 2309.17400): the last K steps (`"last"`, k = K); DRaFT with K = all steps is
  `"all"`.
- AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): every step, with gradient checkpointing (`"all"`,
  `checkpoint=True`).
- LongAlign (Liu et al. 2024, arXiv 2410.11817; code `unet_reward.py`): 50 DDIM steps, 5 of them with gradients,
  one per block of 10 at a shared random offset (`"strided"`, k = 5), the UNet input detached on those steps
  (`detach_input=True`) and the UNet call checkpointed (`checkpoint=True`).

With no gradient steps, `rollout` is diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` loop with a
DDIMScheduler, step for step (`tests/test_rollout.py` checks this), so what is trained is what is sampled.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from t2i_align.conditioning.text import PromptEmbeds
from t2i_align.diffusion import latent_scheduler, unscale_latents
from t2i_align.models import vae_precision

Denoiser = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds, Optional[torch.Tensor]], torch.Tensor]
"""Same as `t2i_align.objectives.base.Denoiser` (not imported: the objectives package imports the config)."""

GRAD_STEP_MODES = ("stratified", "strided", "last", "all", "none")


def choose_grad_steps(mode: str, num_steps: int, k: int = 1,
                      generator: Optional[torch.Generator] = None) -> List[int]:
    """Indices into the chain (0 = the first, noisiest step) that carry gradients, sorted.

    - "stratified": the chain cut into k strata of (nearly) equal size, [j·n//k, (j+1)·n//k), one step drawn
      uniformly and independently in each.
    - "strided": LongAlign's code exactly, `time_bp = time_all[rand_start::10]`: one offset drawn in
      [0, n/k) and shared by all k strata; needs n divisible by k. Each step has the same chance 1/(n/k) as in
      "stratified"; only the joint draw differs.
    - "last": the last k steps (DRaFT-K; ReFL-like for k = 1).  "all": every step (AlignProp; k is ignored).
    - "none": no step (plain sampling).
    Draws use `generator` (a CPU torch.Generator), so a seeded run picks the same steps on resume.
    """
    if mode not in GRAD_STEP_MODES:
        raise ValueError(f"unknown gradient-step mode {mode!r}; choose one of {', '.join(GRAD_STEP_MODES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if mode == "none":
        return []
    if mode == "all":
        return list(range(num_steps))
    if not 1 <= k <= num_steps:
        raise ValueError(f"{mode!r} needs 1 <= k <= num_steps, got k={k} with num_steps={num_steps}")
    if mode == "last":
        return list(range(num_steps - k, num_steps))
    if mode == "strided":
        if num_steps % k:
            raise ValueError(f"'strided' needs num_steps divisible by k (got {num_steps} and {k}); "
                             "use 'stratified' for uneven strata")
        stride = num_steps // k
        offset = int(torch.randint(stride, (1,), generator=generator))
        return list(range(offset, num_steps, stride))
    bounds = [j * num_steps // k for j in range(k + 1)]
    return [lo + int(torch.randint(hi - lo, (1,), generator=generator)) for lo, hi in zip(bounds, bounds[1:])]


def ddim_sampler(scheduler, num_steps: int, device=None):
    """A fresh DDIMScheduler with the training scheduler's noise schedule and prediction type, set to num_steps.

    Fresh, so the caller's scheduler (the loop's DDPM training scheduler) is never mutated by `set_timesteps`.
    """
    from diffusers import DDIMScheduler

    sampler = latent_scheduler(DDIMScheduler, scheduler.config)
    sampler.set_timesteps(num_steps, device=device)
    return sampler


def initial_latents(shape: Sequence[int], generator, scheduler, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T as diffusers' `prepare_latents` makes it: randn with `generator` (one, or one per image) times
    init_noise_sigma, so the same seed gives the same start as the pipeline."""
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
    return latents * scheduler.init_noise_sigma


def _rows(embeds: PromptEmbeds, n: int, what: str) -> PromptEmbeds:
    """embeds with n rows: as given, or one row repeated (the empty prompt)."""
    if len(embeds) == n:
        return embeds
    if len(embeds) == 1:
        return embeds.repeat(n)
    raise ValueError(f"{what} has {len(embeds)} rows; give 1 or {n} (one per latent)")


def cat_embeds(first: PromptEmbeds, second: PromptEmbeds) -> PromptEmbeds:
    """[first; second] along the batch, field by field (so fields added to PromptEmbeds later travel too)."""
    values = {}
    for field in dataclasses.fields(first):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if (a is None) != (b is None):
            raise ValueError(f"PromptEmbeds.{field.name} is set in one of the two embeddings but not the other")
        if isinstance(a, torch.Tensor) and a.shape[1:] != b.shape[1:]:
            raise ValueError(f"PromptEmbeds.{field.name}: conditional {tuple(a.shape)} and unconditional "
                             f"{tuple(b.shape)} differ beyond the batch; encode both the same way")
        values[field.name] = torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
    return type(first)(**values)


def guidance_inputs(embeds: PromptEmbeds, uncond_embeds: Optional[PromptEmbeds], time_ids: Optional[torch.Tensor],
                    n: int, guidance_scale: float) -> Tuple[PromptEmbeds, Optional[torch.Tensor], bool]:
    """(embeds for the UNet batch, time ids for it, whether CFG is on). With CFG (scale > 1, as diffusers'
    `do_classifier_free_guidance`) the batch is [uncond; cond], the unconditional half first as in diffusers."""
    embeds = _rows(embeds, n, "embeds")
    if time_ids is not None and time_ids.shape[0] == 1 and n > 1:
        time_ids = time_ids.expand(n, -1)
    if guidance_scale <= 1.0:
        return embeds, time_ids, False
    if uncond_embeds is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs uncond_embeds (the empty prompt's embeddings)")
    both = cat_embeds(_rows(uncond_embeds, n, "uncond_embeds"), embeds)
    return both, None if time_ids is None else torch.cat([time_ids, time_ids]), True


def _predict(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
             time_ids: Optional[torch.Tensor], guidance_scale: float, cfg: bool, use_checkpoint: bool):
    """The guided prediction eps_u + g (eps_c - eps_u) (or the plain one without CFG) at one step."""
    x_in = torch.cat([x, x]) if cfg else x
    timesteps = t.reshape(1).expand(x_in.shape[0])

    def call(sample):
        return denoiser(sample, timesteps, embeds, time_ids)

    # non-reentrant checkpointing: the UNet's parameters get gradients even when its input does not require them
    pred = torch_checkpoint(call, x_in, use_reentrant=False) if use_checkpoint else call(x_in)
    if not cfg:
        return pred
    uncond, cond = pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _check_steps(grad_steps: Sequence[int], num_steps: int) -> frozenset:
    steps = frozenset(int(i) for i in grad_steps)
    bad = sorted(i for i in steps if not 0 <= i < num_steps)
    if bad:
        raise ValueError(f"grad_steps {bad} are outside the chain's steps 0..{num_steps - 1}")
    return steps


def rollout(denoiser: Denoiser, embeds: PromptEmbeds, uncond_embeds: Optional[PromptEmbeds], scheduler,
            latents: torch.Tensor, *, num_steps: int, guidance_scale: float, grad_steps: Sequence[int] = (),
            detach_input: bool = False, checkpoint: bool = False, time_ids: Optional[torch.Tensor] = None,
            eta: float = 0.0, generator: Optional[torch.Generator] = None,
            x0_prediction: bool = False, grad_step_hook: Optional[Callable] = None) -> torch.Tensor:
    """Run num_steps DDIM steps from x_T = `latents` and return the final latents (diffusers' output_type="latent"),
    or with `x0_prediction` the last step's prediction of x0 (what LongAlign's code decodes; the last update makes
    sqrt(ᾱ_final)·x0 + sqrt(1 - ᾱ_final)·eps of it, ᾱ_final = ᾱ_0 ≈ 0.99915 for SD's set_alpha_to_one=False).

    Step i (0 = noisiest) calls the denoiser with gradients only if i is in `grad_steps` (and grad mode is on);
    every other step calls it under no_grad, so its prediction is a constant. The DDIM update itself,
    x_prev = sqrt(ᾱ_prev)·x0(x_t, eps) + sqrt(1 - ᾱ_prev)·eps, always stays differentiable: the reward's gradient
    flows back along the chain to every earlier gradient step, as in LongAlign's code.
    `detach_input`: the denoiser sees x_t.detach() on gradient steps, cutting the path through the UNet's
    Jacobian in its input (LongAlign) while keeping the one through the update. Without it (AlignProp, DRaFT)
    that path is kept too. Memory grows with len(grad_steps) (each keeps its denoiser activations for backward),
    not with num_steps (a step without gradients keeps nothing but latent-sized update terms). `checkpoint`:
    gradient steps keep only their input and recompute the denoiser in backward (one more forward per gradient
    step), so what is saved for backward is nearly flat in len(grad_steps) too (toy model, 50-step chain: 3.2 MiB
    at 1 gradient step, 3.5 at 50; the peak still grows, 6 → 64 MiB, against 11 → 399 without checkpointing:
    benchmarks/results/reward_backprop_step_toy_cpu.json from benchmarks/reward_backprop_step.py).
    `scheduler`: any diffusers scheduler whose config holds the noise schedule (the training DDPM one); a fresh
    DDIMScheduler is built from it, so its config decides the timesteps (SD1.5's "leading" spacing gives
    981 … 1 for 50 steps; LongAlign's 999 … 19 is `timestep_spacing="trailing"`, e.g. a scheduler made with
    `DDIMScheduler.from_config(config, timestep_spacing="trailing")`). `eta` > 0 adds DDIM noise drawn from
    `generator`.
    `grad_step_hook(eps, predict)`: called on every gradient step with its prediction and `predict(other)`, which
    gives another denoiser's prediction at the same input, timestep and conditioning (e.g. a KL anchor).
    """
    steps = _check_steps(grad_steps, num_steps)
    sampler = ddim_sampler(scheduler, num_steps, latents.device)
    batch_embeds, batch_time_ids, cfg = guidance_inputs(embeds, uncond_embeds, time_ids, len(latents),
                                                        guidance_scale)
    x = latents
    for i, t in enumerate(sampler.timesteps):
        with_grad = i in steps and torch.is_grad_enabled()
        x_in = x.detach() if detach_input or not with_grad else x
        with torch.set_grad_enabled(with_grad):
            eps = _predict(denoiser, x_in, t, batch_embeds, batch_time_ids, guidance_scale, cfg,
                           checkpoint and with_grad)
        if with_grad and grad_step_hook is not None:
            grad_step_hook(eps, functools.partial(_predict, x=x_in.detach(), t=t, embeds=batch_embeds,
                                                  time_ids=batch_time_ids, guidance_scale=guidance_scale, cfg=cfg,
                                                  use_checkpoint=False))
        x, x0 = sampler.step(eps, t, x, eta=eta, generator=generator, return_dict=False)
    return x0 if x0_prediction else x


def decode(vae, latents: torch.Tensor, *, grad: bool, checkpoint: bool = False) -> torch.Tensor:
    """VAE-decode scaled latents to float32 images in [-1, 1] (the VAE's range; `(x + 1) / 2` gives the [0, 1]
    that rewards take), with gradients to `latents` when `grad`. The clamp matches diffusers' postprocessing
    and LongAlign's `(dec*0.5+0.5).clamp(0,1)`. `checkpoint` recomputes the decoder in backward (memory for
    time: the decoder runs at full image resolution, so its activations can rival a UNet step's)."""
    scaled = unscale_latents(vae, latents).to(vae.dtype)

    def run(z):
        with vae_precision(vae):
            return vae.decode(z).sample

    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        images = torch_checkpoint(run, scaled, use_reentrant=False) if grad and checkpoint else run(scaled)
    return images.float().clamp(-1.0, 1.0)
