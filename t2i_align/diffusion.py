"""Shared diffusion training math: timesteps, forward noising, the training target and the per-sample MSE.

Notation (Ho et al. 2020, "DDPM"): ᾱ_t = scheduler.alphas_cumprod[t], x_0 the clean latents, ε ~ N(0, I).
Everything is read from `scheduler.alphas_cumprod`, which DDPM, DDIM and Euler schedulers all carry, so the
training math does not depend on which sampler the folder ships (Euler's own `add_noise` is x_0 + σ·ε, a
sampling-time parametrisation that would be wrong here).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Tuple, Union

import torch

Device = Union[str, torch.device, None]

TIMESTEP_SETS = ("uniform", "turbo")


def _draw_device(generator: Optional[torch.Generator], device: Device) -> Device:
    """Random draws happen where the generator lives (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else device


def sample_timesteps(scheduler: Any, n: int, generator: Optional[torch.Generator] = None,
                     device: Device = None, kind: str = "uniform") -> torch.Tensor:
    """Training timesteps as a LongTensor [n], T = scheduler.config.num_train_timesteps.

    - "uniform": t ~ U{0, ..., T-1}, the DDPM simple loss's (Ho et al. 2020, Eq. 14) and Diffusion-DPO's (Wallace
      et al. 2023, Eq. 14); the official code draws `randint(0, num_train_timesteps)`.
    - "turbo": only the four steps a Turbo model (SDXL-Turbo / SD-Turbo, Sauer et al. 2023, "Adversarial
      Diffusion Distillation") samples at: the official code (for a model named *turbo*) and diffusers'
      `--is_turbo` map the uniform draw to 250·(t mod 4) + 249, i.e. {249, 499, 749, 999}; here T/4 for 250.
    """
    if kind not in TIMESTEP_SETS:
        raise ValueError(f"unknown timestep set {kind!r}; use one of {', '.join(TIMESTEP_SETS)}")
    num_steps = int(scheduler.config.num_train_timesteps)
    if kind == "turbo" and num_steps < 4:
        raise ValueError(f"turbo timesteps need a schedule of at least 4 steps, this one has {num_steps}")
    t = torch.randint(0, num_steps, (n,), generator=generator, device=_draw_device(generator, device))
    if kind == "turbo":
        quarter = num_steps // 4
        t = quarter * (t % 4) + quarter - 1
    return t.to(device) if device is not None else t


def sample_noise(shape: Sequence[int], generator: Optional[torch.Generator] = None, device: Device = None,
                 dtype: torch.dtype = torch.float32, offset: float = 0.0) -> torch.Tensor:
    """ε ~ N(0, I) of the given shape, drawn with `generator` if given, else the process's global RNG (training's:
    seeded per process by `build.py`, restored on resume with accelerate's state).

    `offset` > 0 adds offset noise (Guttenberg 2023, "Diffusion with Offset Noise"; diffusers' `--noise_offset`):
    ε + offset · z, z ~ N(0, 1) of shape [B, C, 1, ...], one constant per sample and channel, drawn after ε. A
    model trained on zero-mean ε keeps the mean of its starting noise, so it cannot draw images much darker or
    brighter than average; the offset teaches it to move the mean.
    """
    draw = _draw_device(generator, device)
    eps = torch.randn(tuple(shape), generator=generator, device=draw)
    if offset:
        eps = eps + offset * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator, device=draw)
    return eps.to(device=device, dtype=dtype) if device is not None else eps.to(dtype)


def perturb_input(noise: torch.Tensor, amount: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ε + amount · ξ, ξ ~ N(0, I) drawn after everything else of the step: the noise x_t is built from while the
    target stays ε (input perturbation, Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models", Eq. 9; the official Diffusion-DPO code's `--input_perturbation`, and diffusers' text-to-image
    example's, usually 0.1)."""
    if not amount:
        return noise
    xi = torch.randn(tuple(noise.shape), generator=generator, device=_draw_device(generator, noise.device))
    return noise + amount * xi.to(device=noise.device, dtype=noise.dtype)


def noised(scheduler: Any, latents: torch.Tensor, generator: Optional[torch.Generator] = None, repeats: int = 1,
           offset: float = 0.0, perturbation: float = 0.0, timesteps: str = "uniform"
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, training target) for `latents` [repeats·n, ...], where the n draws of (ε, t) are shared by the
    `repeats` blocks of n samples: DPO's [w; l] (official `noise.chunk(2)[0].repeat(2)`), so the pair's noise
    variance cancels in mse_w - mse_l. `offset`: `sample_noise`'s; `timesteps`: `sample_timesteps`' kind;
    `perturbation`: `perturb_input`'s amount, its ξ shared by the blocks too. The official code perturbs the noise
    before sharing it, so with `--input_perturbation` its loser's x_t is built from the loser's own ε_l + γξ_l
    while its target is the winner's ε_w: input and target no longer match (marked "haven't tried yet" there)."""
    n = latents.shape[0] // repeats
    if n * repeats != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} samples do not split into {repeats} equal blocks")
    noise = sample_noise((n, *latents.shape[1:]), generator, latents.device, latents.dtype, offset)
    t = sample_timesteps(scheduler, n, generator, latents.device, timesteps)
    seen = perturb_input(noise, perturbation, generator)

    def shared(x: torch.Tensor) -> torch.Tensor:
        return x.repeat(repeats, *([1] * (x.dim() - 1)))

    noise, t, seen = shared(noise), shared(t), shared(seen)
    return add_noise(scheduler, latents, seen, t), t, training_target(scheduler, latents, noise, t)


def zero_terminal_snr(scheduler: Any) -> Any:
    """A copy of `scheduler` whose ᾱ_t reaches 0 at the last step (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps Are Flawed", Alg. 1): sqrt(ᾱ) shifted so its last value is 0, then scaled so its
    first is unchanged; equal to diffusers' `rescale_betas_zero_snr`. The official Diffusion-DPO code (for a model
    named *turbo*: "Turbo needs zero terminal SNR to truly learn from noise") and diffusers' SDXL DPO script
    (`--is_turbo`) rescale their training schedule so. Training only (the math here reads
    `alphas_cumprod`): at ᾱ_T = 0 an ε-prediction no longer gives x_0, so samplers keep the folder's schedule."""
    root = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    rescaled = copy.deepcopy(scheduler)
    rescaled.alphas_cumprod = (root ** 2).to(torch.float32)
    return rescaled


def _alpha_sigma(scheduler: Any, timesteps: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) in fp32, shaped [B, 1, 1, ...] to broadcast against `like`."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=like.device)
    abar = alphas_cumprod[timesteps.to(like.device).long()]
    abar = abar.reshape(-1, *([1] * (like.dim() - 1)))
    return abar.sqrt(), (1.0 - abar).sqrt()


def add_noise(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Sample of q(x_t | x_0): x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε (Ho et al. 2020, Eq. 4).

    Computed in fp32 (ᾱ_t near 1 loses digits in fp16) and returned in the latents' dtype; equals
    `DDPMScheduler.add_noise`.
    """
    a, s = _alpha_sigma(scheduler, timesteps, latents)
    return (a * latents.float() + s * noise.float()).to(latents.dtype)


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by `scheduler.config.prediction_type`.

    - "epsilon": ε itself (Ho et al. 2020, Eq. 14; the only type the official Diffusion-DPO code accepts).
    - "v_prediction": v = sqrt(ᾱ_t)·ε - sqrt(1 - ᾱ_t)·x_0 (Salimans & Ho 2022, "Progressive Distillation",
      Sec. 4), computed in fp32; equals `DDPMScheduler.get_velocity`.
    Anything else (e.g. "sample") raises ValueError.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a, s = _alpha_sigma(scheduler, timesteps, latents)
        return (a * noise.float() - s * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}: use 'epsilon' or 'v_prediction'")


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights, Tensor[B] in fp32 (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", Eq. 9; diffusers' `--snr_gamma`): SNR(t) = ᾱ_t / (1 - ᾱ_t); min(SNR, γ) / SNR for an
    ε-prediction, min(SNR, γ) / (SNR + 1) for a v-prediction (the same weight on the x_0 error). Written as
    min(1, γ / SNR) for ε, so that the SNR of 0 a zero-terminal schedule reaches gives its limit 1, not 0 / 0."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=timesteps.device)
    abar = alphas_cumprod[timesteps.long()]  # on the timesteps' device: no sync with a GPU each step
    snr = abar / (1.0 - abar)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        weights = (gamma / snr).clamp(max=1.0)
    elif kind == "v_prediction":
        weights = snr.clamp(max=gamma) / (snr + 1.0)
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}: use 'epsilon' or 'v_prediction'")
    return weights


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred - target‖² / (C·h·w) per sample: Tensor[B] in fp32, the mean over every non-batch dim.

    The mean (not the paper's sum) is what the official Diffusion-DPO code uses, and the published β values
    (2000-5000) are tied to it. fp32 because squared fp16/bf16 errors underflow and their mean loses digits.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def _latent_stats(vae, latents: torch.Tensor):
    """(mean, std) the latents are normalised by: a VAE config's per-channel `latents_mean` / `latents_std`, which
    diffusers' SDXL pipeline applies when set (null for SDXL base), else its `shift_factor` and 1 (0 for SD1.5)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean)) + (1,) * (latents.dim() - 2)
        return (torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape),
                torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape))
    return getattr(vae.config, "shift_factor", None) or 0.0, 1.0


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the UNet's latent space: (z - mean) · scaling_factor / std (`_latent_stats`)."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) * vae.config.scaling_factor / std


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latents -> what the VAE decodes, the inverse of `scale_latents` (the pipeline's decode)."""
    mean, std = _latent_stats(vae, latents)
    return latents * std / vae.config.scaling_factor + mean


def latent_scheduler(cls: Any, config: Any, **extra: Any) -> Any:
    """`cls.from_config(config, **extra)` with clip_sample False unless `config` sets it. DDPM and DDIM default to
    clipping x̂_0 to [-1, 1], meant for pixel-space models; SD's own configs say false, but a latent model's config
    saved by an Euler or DPM++ scheduler has no such key, and clipping latents (std about 1) dulls every image."""
    if "clip_sample" not in config:
        extra.setdefault("clip_sample", False)
    return cls.from_config(config, **extra)
