"""From data-loader batches to what objectives consume, and the denoiser closures they call.

Objectives see latents, prompt embeddings and (SDXL) time ids only; whether those came from a cache or were
encoded here, and whether the UNet is SD1.5 or SDXL, LoRA or full, is settled in this module.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .conditioning.text import PromptEmbeds, encode_prompts, sdxl_time_ids
from .models import Components, lora_reference
from .objectives.base import Denoiser, ImageBatch, PairBatch


@torch.no_grad()
def encode_images(components: Components, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (a sample of the posterior, as the official DPO code) scaled by the VAE's scaling factor."""
    vae = components.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    return (latents * vae.config.scaling_factor).float()


def _time_ids(components: Components, raw: Dict, side: str, resolution: int) -> Optional[torch.Tensor]:
    if not components.spec.uses_time_ids:
        return None
    return sdxl_time_ids(raw[f"original_size_{side}"], raw[f"crop_top_left_{side}"], (resolution, resolution))


def _embeds(components: Components, raw: Dict, device) -> PromptEmbeds:
    if "prompt_embeds" in raw:
        return PromptEmbeds(raw["prompt_embeds"], raw.get("pooled_prompt_embeds")).to(device)
    return encode_prompts(components, list(raw["caption"])).to(device)


def to_pair_batch(components: Components, raw: Dict, device) -> PairBatch:
    if "latents_w" in raw:
        lw, ll = raw["latents_w"].to(device), raw["latents_l"].to(device)
    else:
        lw, ll = encode_images(components, raw["pixels_w"]), encode_images(components, raw["pixels_l"])
    res = int(lw.shape[-1] * components.vae_scale_factor)
    tw, tl = _time_ids(components, raw, "w", res), _time_ids(components, raw, "l", res)
    return PairBatch(latents_w=lw.to(device), latents_l=ll.to(device), embeds=_embeds(components, raw, device),
                     time_ids_w=None if tw is None else tw.to(device),
                     time_ids_l=None if tl is None else tl.to(device))


def to_image_batch(components: Components, raw: Dict, device) -> ImageBatch:
    """The preferred image of each pair (SFT on pair data) or an image batch (RAFT)."""
    side = "w" if "pixels_w" in raw or "latents_w" in raw else ""
    key = f"latents_{side}" if side else "latents"
    if key in raw:
        latents = raw[key].to(device)
    else:
        latents = encode_images(components, raw[f"pixels_{side}" if side else "pixels"])
    res = int(latents.shape[-1] * components.vae_scale_factor)
    tids = _time_ids(components, raw, side or "w", res) if side else raw.get("time_ids")
    return ImageBatch(latents=latents.to(device), embeds=_embeds(components, raw, device),
                      time_ids=None if tids is None else tids.to(device))


def make_denoiser(unet: torch.nn.Module, components: Components) -> Denoiser:
    """The UNet as (noisy latents, t, embeds, time ids) -> prediction, with the family's extra inputs."""
    added = components.spec.added_cond_kwargs

    def denoise(noisy, t, embeds: PromptEmbeds, time_ids=None):
        kwargs = added(embeds, time_ids)
        return unet(noisy, t, encoder_hidden_states=embeds.prompt_embeds,
                    added_cond_kwargs=kwargs or None).sample

    return denoise


def make_reference(policy_unet: torch.nn.Module, components: Components, lora: bool,
                   frozen: Optional[torch.nn.Module]) -> Denoiser:
    """LoRA: the policy UNet with adapters disabled, without gradients. Full: a frozen copy in weight dtype."""
    if lora:
        inner = make_denoiser(policy_unet, components)

        def reference(noisy, t, embeds, time_ids=None):
            with lora_reference(policy_unet):
                return inner(noisy, t, embeds, time_ids)

        return reference
    if frozen is None or frozen is policy_unet:
        raise ValueError("full fine-tuning needs a frozen reference copy that is not the policy UNet")
    inner = make_denoiser(frozen, components)
    dtype = next(frozen.parameters()).dtype

    @torch.no_grad()
    def reference(noisy, t, embeds, time_ids=None):
        device = next(frozen.parameters()).device
        if device != noisy.device:  # offloaded between uses
            frozen.to(noisy.device)
        out = inner(noisy.to(dtype), t, embeds.to(noisy.device, dtype), time_ids).float()
        if device != noisy.device:
            frozen.to(device)
        return out

    return reference


BatchFn = Callable[[Components, Dict, torch.device], object]
BATCH_BUILDERS: Dict[str, BatchFn] = {"pairs": to_pair_batch, "images": to_image_batch}
