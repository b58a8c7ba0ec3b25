"""From data-loader batches to what objectives consume, and the denoiser closures they call.

Objectives see latents, prompt embeddings and (SDXL) time ids only; whether those came from a cache or were
encoded here, and whether the UNet is SD1.5 or SDXL, LoRA or full, is settled in this module.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .conditioning.text import PromptEmbeds, encode_prompts, sdxl_time_ids
from .diffusion import scale_latents
from .models import Components, vae_precision
from .objectives.base import Denoiser, ImageBatch, PairBatch, PromptBatch


@torch.no_grad()
def encode_images(components: Components, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (a sample of the posterior, as the official DPO code) scaled by the VAE's scaling factor."""
    vae = components.vae
    with vae_precision(vae):
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    return scale_latents(vae, latents).float()


def _time_ids(components: Components, raw: Dict, side: str, resolution: int) -> Optional[torch.Tensor]:
    """SDXL's time ids of a batch's images (data.time_ids): "fixed" as the pipeline samples, [R, R, 0, 0, R, R]
    (official Diffusion-DPO, train.py's SDXL branch), or each image's true size and crop ("per_image")."""
    if not components.spec.uses_time_ids:
        return None
    suffix = f"_{side}" if side else ""  # pairs: _w / _l; image-caption data: none
    size, crop = raw[f"original_size{suffix}"], raw[f"crop_top_left{suffix}"]
    if components.time_ids == "fixed":
        size, crop = (resolution, resolution), (0, 0)
    return sdxl_time_ids(size, crop, (resolution, resolution), batch_size=len(raw[f"original_size{suffix}"]))


def _embeds(components: Components, raw: Dict, device) -> PromptEmbeds:
    if "prompt_embeds" in raw:
        embeds = PromptEmbeds(raw["prompt_embeds"], raw.get("pooled_prompt_embeds")).to(device)
    else:
        embeds = encode_prompts(components, list(raw["caption"])).to(device)
    if components.users is not None:  # PPD: each row's user tokens from the user table (with embedding dropout)
        embeds.user_tokens = components.users.batch_tokens(raw, device)
    return embeds


def _dropped(raw: Dict) -> Tuple[Tuple[int, str], ...]:
    return tuple((i, c) for i, c in enumerate(raw.get("dropped_caption", ())) if c)


def to_pair_batch(components: Components, raw: Dict, device) -> PairBatch:
    if "latents_w" in raw:
        lw, ll = raw["latents_w"].to(device), raw["latents_l"].to(device)
    else:
        lw, ll = encode_images(components, raw["pixels_w"]), encode_images(components, raw["pixels_l"])
    res = int(lw.shape[-1] * components.vae_scale_factor)
    tw, tl = _time_ids(components, raw, "w", res), _time_ids(components, raw, "l", res)
    return PairBatch(latents_w=lw.to(device), latents_l=ll.to(device), embeds=_embeds(components, raw, device),
                     time_ids_w=None if tw is None else tw.to(device),
                     time_ids_l=None if tl is None else tl.to(device), dropped_captions=_dropped(raw))


def to_image_batch(components: Components, raw: Dict, device) -> ImageBatch:
    """The preferred image of each pair (SFT on pair data) or an image batch (image-caption data, RAFT)."""
    side = "w" if "pixels_w" in raw or "latents_w" in raw else ""
    key = f"latents_{side}" if side else "latents"
    if key in raw:
        latents = raw[key].to(device)
    else:
        latents = encode_images(components, raw[f"pixels_{side}" if side else "pixels"])
    res = int(latents.shape[-1] * components.vae_scale_factor)
    tids = _time_ids(components, raw, side, res) if side or "original_size" in raw else raw.get("time_ids")
    return ImageBatch(latents=latents.to(device), embeds=_embeds(components, raw, device),
                      time_ids=None if tids is None else tids.to(device), dropped_captions=_dropped(raw))


def unet_kwargs(components: Components, embeds: PromptEmbeds, time_ids=None) -> Dict:
    """The UNet's keyword inputs besides (sample, t): text states and the family's added conditioning, plus PPD's
    user tokens as `image_embeds` when the embeds carry them (a UNet without a user branch ignores those)."""
    added = dict(components.spec.added_cond_kwargs(embeds, time_ids) or {})
    if embeds.user_tokens is not None:
        from .conditioning.users import user_added_cond

        added.update(user_added_cond(embeds.user_tokens))
    return {"encoder_hidden_states": embeds.prompt_embeds, "added_cond_kwargs": added or None}


def make_denoiser(unet: torch.nn.Module, components: Components) -> Denoiser:
    """The UNet as (noisy latents, t, embeds, time ids) -> prediction, with the family's extra inputs."""
    branch = getattr(getattr(unet, "module", unet), "encoder_hid_proj", None) is not None  # unwrap DDP

    def denoise(noisy, t, embeds: PromptEmbeds, time_ids=None):
        if branch and embeds.user_tokens is None:
            raise ValueError("this UNet has a user branch (ppd.enabled) but the prompt embeddings carry no user "
                             "tokens; every batch needs PromptEmbeds.user_tokens (a user_id per row)")
        return unet(noisy, t, **unet_kwargs(components, embeds, time_ids)).sample

    return denoise


def to_prompt_batch(components: Components, raw: Dict, device) -> PromptBatch:
    """Captions and their embeddings only (reward-gradient methods generate their images); for SDXL the time ids
    of an uncropped image at the training resolution (`raw["resolution"]`), as RAFT's samples get."""
    captions = list(raw["caption"])
    time_ids = None
    if components.spec.uses_time_ids:
        res = int(raw["resolution"])
        time_ids = sdxl_time_ids((res, res), (0, 0), (res, res), batch_size=len(captions)).to(device)
    return PromptBatch(captions, _embeds(components, raw, device), time_ids)


BatchFn = Callable[[Components, Dict, torch.device], object]
BATCH_BUILDERS: Dict[str, BatchFn] = {"pairs": to_pair_batch, "images": to_image_batch, "prompts": to_prompt_batch}
