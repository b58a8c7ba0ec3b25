"""Batched generation at fixed seeds, returning latents and decoded images.

Every image has its own seed (one `torch.Generator` each), so a base and a tuned model sampled with the same
prompts and seeds start from identical noise, and an image does not depend on the batch it was generated in.
Classifier-free guidance runs conditional and unconditional in one batch (diffusers' pipelines do this).
A batch that runs out of accelerator memory is retried in halves.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass
class Samples:
    latents: torch.Tensor
    """Final latents in the UNet's (scaled) latent space, [N, C, h, w]."""
    images: torch.Tensor
    """Decoded images, float [N, 3, H, W] in [0, 1]."""
    prompts: List[str]
    seeds: List[int]


SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


def set_scheduler(pipe, name: Optional[str]):
    """Swap the pipeline's sampler ("ddim", "dpm++", "euler"; None keeps the folder's), keeping its noise schedule."""
    if name is None:
        return pipe
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(model: str | Path, lora: Optional[str | Path] = None, device: str = "cpu",
                  scheduler: Optional[str] = None):
    """A diffusers pipeline from a local folder ("toy" for the shipped toy model), optionally with LoRA weights."""
    from diffusers import DiffusionPipeline

    from .models import ModelLoadError, resolve_pretrained

    path = resolve_pretrained(str(model))
    pipe = DiffusionPipeline.from_pretrained(str(path))
    if lora is not None:
        lora = Path(lora)
        if not lora.exists():
            raise ModelLoadError(f"LoRA weights not found: {lora} (expected pytorch_lora_weights.safetensors or "
                                 "the folder holding it)")
        try:
            pipe.load_lora_weights(str(lora))
        except (ValueError, RuntimeError, KeyError, IndexError) as err:
            raise ModelLoadError(f"LoRA weights {lora} do not match the model in {path}: {err!r}") from err
        if not getattr(pipe.unet, "peft_config", None):  # diffusers only warns when no key matches
            raise ModelLoadError(f"LoRA weights {lora} do not match the model in {path}: no UNet layer took them")
    pipe.set_progress_bar_config(disable=True)
    return set_scheduler(pipe, scheduler).to(device)


def seeds_for(num_prompts: int, per_prompt: int, base_seed: int = 0) -> List[List[int]]:
    """Seed k of prompt i is base_seed + 10_000·k + i: fixed per (prompt, k), independent of batching."""
    return [[base_seed + 10_000 * k + i for k in range(per_prompt)] for i in range(num_prompts)]


def prompt_major(prompts: Sequence, per_prompt: int, base_seed: int = 0) -> Tuple[List, List[int]]:
    """(each prompt repeated per_prompt times, the matching `seeds_for` seeds): prompt i's images are rows
    i·per_prompt .. i·per_prompt + per_prompt - 1."""
    flat = [p for p in prompts for _ in range(per_prompt)]
    return flat, [s for row in seeds_for(len(prompts), per_prompt, base_seed) for s in row]


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 20,
             guidance_scale: float = 3.0, batch_size: int = 64, negative_prompt: Optional[str] = None,
             height: Optional[int] = None, width: Optional[int] = None) -> Samples:
    """Sample one image per (prompt, seed) pair, `batch_size` images at a time."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    if not prompts:
        raise ValueError("generate got no prompts")
    kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, negative_prompt=negative_prompt)
    latents, images = [], []
    start = 0
    while start < len(prompts):
        chunk = slice(start, start + batch_size)
        try:
            lat, img = _generate_chunk(pipe, list(prompts[chunk]), list(seeds[chunk]), **kwargs)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            _empty_cache()
            continue
        latents.append(lat)
        images.append(img)
        start += len(lat)
    return Samples(torch.cat(latents), torch.cat(images), list(prompts), [int(s) for s in seeds])


def _generate_chunk(pipe, prompts: List[str], seeds: List[int], negative_prompt: Optional[str], **kwargs):
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompts, generator=gens, output_type="latent",
               negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None, **kwargs)
    lat = out.images.to(pipe.unet.device)
    return lat.cpu(), _decode(pipe, lat).cpu()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
