"""Batched generation at fixed seeds, returning latents and decoded images.

Every image has its own seed (one `torch.Generator` each), so a base and a tuned model sampled with the same
prompts and seeds start from identical noise, and an image does not depend on the batch it was generated in.
Classifier-free guidance runs conditional and unconditional in one batch (diffusers' pipelines do this).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch


@dataclass
class Samples:
    latents: torch.Tensor
    """Final latents in the UNet's (scaled) latent space, [N, C, h, w]."""
    images: torch.Tensor
    """Decoded images, float [N, 3, H, W] in [0, 1]."""
    prompts: List[str]
    seeds: List[int]


def load_pipeline(model: str | Path, lora: Optional[str | Path] = None, device: str = "cpu"):
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
        except (ValueError, RuntimeError, KeyError) as err:
            raise ModelLoadError(f"LoRA weights {lora} do not match the model in {path}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def seeds_for(num_prompts: int, per_prompt: int, base_seed: int = 0) -> List[List[int]]:
    """Seed k of prompt i is base_seed + 10_000·k + i: fixed per (prompt, k), independent of batching."""
    return [[base_seed + 10_000 * k + i for k in range(per_prompt)] for i in range(num_prompts)]


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
    device = pipe.unet.device
    latents, images = [], []
    for start in range(0, len(prompts), batch_size):
        chunk_p = list(prompts[start:start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        out = pipe(chunk_p, generator=gens, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, output_type="latent", height=height, width=width,
                   negative_prompt=[negative_prompt] * len(chunk_p) if negative_prompt else None)
        lat = out.images.to(device)
        latents.append(lat.cpu())
        images.append(_decode(pipe, lat).cpu())
    return Samples(torch.cat(latents), torch.cat(images), list(prompts), [int(s) for s in seeds])
