"""Shared diffusion training math: timesteps, forward noising, the training target and the per-sample MSE.

Notation (Ho et al. 2020, "DDPM"): ᾱ_t = scheduler.alphas_cumprod[t], x_0 the clean latents, ε ~ N(0, I).
Everything is read from `scheduler.alphas_cumprod`, which DDPM, DDIM and Euler schedulers all carry, so the
training math does not depend on which sampler the folder ships (Euler's own `add_noise` is x_0 + σ·ε, a
sampling-time parametrisation that would be wrong here).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch

Device = Union[str, torch.device, None]


def _draw_device(generator: Optional[torch.Generator], device: Device) -> Device:
    """Random draws happen where the generator lives (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else device


def sample_timesteps(scheduler: Any, n: int, generator: Optional[torch.Generator] = None,
                     device: Device = None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, T = scheduler.config.num_train_timesteps, as a LongTensor [n].

    The uniform t of the DDPM simple loss (Ho et al. 2020, Eq. 14) and of Diffusion-DPO (Wallace et al. 2023,
    Eq. 14: t ~ U(0, T)); the official code draws `randint(0, num_train_timesteps)`.
    """
    num_steps = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, num_steps, (n,), generator=generator, device=_draw_device(generator, device))
    return t.to(device) if device is not None else t


def sample_noise(shape: Sequence[int], generator: Optional[torch.Generator] = None, device: Device = None,
                 dtype: torch.dtype = torch.float32, offset: float = 0.0) -> torch.Tensor:
    """ε ~ N(0, I) of the given shape, drawn with `generator` (seeds are passed explicitly, never global).

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


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred - target‖² / (C·h·w) per sample: Tensor[B] in fp32, the mean over every non-batch dim.

    The mean (not the paper's sum) is what the official Diffusion-DPO code uses, and the published β values
    (2000-5000) are tied to it. fp32 because squared fp16/bf16 errors underflow and their mean loses digits.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the UNet's latent space: (z - shift) · scaling_factor (no shift for SD1.5 / SDXL)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latents -> what the VAE decodes, the inverse of `scale_latents`."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift
