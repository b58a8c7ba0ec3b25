"""PPD's user branch: IP-Adapter-style decoupled cross-attention over user tokens, in diffusers' own format.

PPD (Dang et al., "Personalized Preference Fine-tuning of Diffusion Models", CVPR 2025, arXiv 2501.06655)
conditions the denoiser on a user embedding (a VLM's hidden states, [29, 3584] for LLaVA-OneVision Qwen2-7B)
through new cross-attention layers beside the text ones, as IP-Adapter (Ye et al. 2023, arXiv 2308.06721) does
for image prompts. In every cross-attention layer:

    Z' = softmax(Q Kᵀ/√d) V  +  λ · softmax(Q K'ᵀ/√d) V',    K' = P(u) W_k',  V' = P(u) W_v'

with λ the user scale and P a per-token projection from the user width to the cross-attention width. It is built
from diffusers' own parts, so plain diffusers loads what `save_user_branch` writes:

    pipe.load_ip_adapter(folder, subfolder="", weight_name=USER_WEIGHT_NAME, image_encoder_folder=None)
    pipe(prompt, ip_adapter_image_embeds=pipeline_user_embeds(user_tokens, dtype=pipe.unet.dtype))

- every cross-attention processor becomes an `IPAdapterAttnProcessor2_0` (or its xformers / pre-2.0 sibling),
  holding to_k_ip / to_v_ip;
- `unet.encoder_hid_proj` = `MultiIPAdapterImageProjection([IPAdapterFullImageProjection(user_dim, cross_dim)])`,
  i.e. Linear → GELU → Linear → LayerNorm on each token. It is the one diffusers image-projection format that maps
  a [B, T, D_user] sequence to [B, T, D_cross] for any T (`ImageProjection` takes one pooled vector; the Plus
  Resampler squeezes the tokens into a fixed set of learned queries and wants widths that are multiples of 64);
- the user tokens enter the UNet as `added_cond_kwargs={"image_embeds": [tokens[:, None]]}` (`user_added_cond`).

Zero init: to_v_ip = 0, so V' = 0 and each layer adds exactly 0.0; the untrained UNet is bit-for-bit the base.
to_k_ip starts as a copy of the layer's text to_k (as IP-Adapter's training script initialises it), so K' gets
gradients as soon as V' moves. "No user" is user scale 0 (the processor then skips the branch: bit-for-bit the
base), never a zero embedding: once the projection's biases and LayerNorm are trained, a zero vector maps to
non-zero tokens (the trap the unofficial PPD stage-2 re-implementation ran into).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from t2i_align.errors import UserError

USER_WEIGHT_NAME = "user_branch.safetensors"
_METADATA_KEY = "t2i_align.user_branch"
# Module names inside IPAdapterFullImageProjection (diffusers) -> the original IP-Adapter file's names, which is
# what diffusers' loader (`_convert_ip_adapter_image_proj_to_diffusers`, "IP-Adapter Full") expects in a file.
_PROJ_TO_FILE = (("ff.net.0.proj.", "proj.0."), ("ff.net.2.", "proj.2."), ("norm.", "proj.3."))


class UserBranchError(UserError, RuntimeError):
    """The user branch cannot be added, saved or loaded as asked; the message says what to change."""


def _ip_processor_classes() -> Dict[str, Tuple[type, type]]:
    """Base processor class name -> (its IP-Adapter sibling, the class to restore on removal)."""
    from diffusers.models import attention_processor as ap

    return {
        "AttnProcessor2_0": (ap.IPAdapterAttnProcessor2_0, ap.AttnProcessor2_0),
        "AttnProcessor": (ap.IPAdapterAttnProcessor, ap.AttnProcessor),
        "XFormersAttnProcessor": (ap.IPAdapterXFormersAttnProcessor, ap.XFormersAttnProcessor),
    }


def _is_user_processor(processor) -> bool:
    return type(processor).__name__ in {c.__name__ for c, _ in _ip_processor_classes().values()}


def _cross_attention_layers(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(processor name, Attention module) of every cross-attention layer, in `unet.attn_processors` order.

    The same selection and order as diffusers' `_convert_ip_adapter_attn_to_diffusers` (every processor not named
    `attn1`, motion modules excluded), whose file keys count these layers as 1, 3, 5, ...
    """
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        if not attn.is_cross_attention:
            raise UserBranchError(f"{name} is neither self-attention (attn1) nor cross-attention; this UNet layout "
                                  "is not supported by the user branch")
        layers.append((name, attn))
    if not layers:
        raise UserBranchError("the UNet has no cross-attention layers to attach a user branch to")
    return layers


def has_user_branch(unet: nn.Module) -> bool:
    """Whether `unet` carries a user branch (or any IP-Adapter: the two are the same machinery)."""
    return any(_is_user_processor(p) for p in unet.attn_processors.values())


def _require_branch(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    layers = _cross_attention_layers(unet)
    if not all(_is_user_processor(attn.processor) for _, attn in layers):
        raise UserBranchError("the UNet has no user branch; add one with add_user_branch(unet, user_dim, num_tokens) "
                              "or load one with load_user_branch(unet, folder)")
    if len(layers[0][1].processor.to_k_ip) != 1:
        raise UserBranchError(f"the UNet carries {len(layers[0][1].processor.to_k_ip)} IP-Adapters; a user branch "
                              "is exactly one")
    return layers


def add_user_branch(unet: nn.Module, user_dim: int, num_tokens: int, scale: float = 1.0,
                    dtype: Optional[torch.dtype] = None) -> List[nn.Parameter]:
    """Attach a zero-initialised user branch to a diffusers UNet2DConditionModel; return its trainable parameters.

    user_dim: width D_user of a user token (3584 for PPD's Qwen2-7B hidden states). num_tokens: tokens per user
    (29 for all of PPD's layers); recorded and checked by `user_added_cond(tokens, unet)`, the projection itself
    works per token. dtype: of the new weights (default the UNet's). The base weights are left as they are:
    freeze them (`unet.requires_grad_(False)`) before calling this to train the branch alone, as PPD does.
    """
    if user_dim < 1 or num_tokens < 1:
        raise ValueError(f"user_dim={user_dim} and num_tokens={num_tokens} must both be positive")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise UserBranchError(f"the UNet already has an encoder_hid_proj ({type(unet.encoder_hid_proj).__name__}, "
                              f"encoder_hid_dim_type={unet.config.encoder_hid_dim_type!r}); remove the IP-Adapter or "
                              "user branch first (remove_user_branch)")
    from diffusers.models.embeddings import IPAdapterFullImageProjection, MultiIPAdapterImageProjection

    layers = _cross_attention_layers(unet)
    device, dtype = layers[0][1].to_k.weight.device, dtype or layers[0][1].to_k.weight.dtype
    classes = _ip_processor_classes()
    procs = dict(unet.attn_processors)
    for name, attn in layers:
        base = type(attn.processor).__name__
        if base not in classes:
            raise UserBranchError(f"{name} uses {base}; the user branch needs one of {sorted(classes)} "
                                  "(set the attention backend before adding the branch)")
        proc = classes[base][0](hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features,
                                num_tokens=[num_tokens], scale=float(scale))
        if base == "XFormersAttnProcessor":
            proc.attention_op = attn.processor.attention_op
        proc.to(device=device, dtype=dtype)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.zero_()
        procs[name] = proc
    unet.set_attn_processor(procs)
    cross_dim = layers[0][1].to_k.in_features
    proj = IPAdapterFullImageProjection(image_embed_dim=user_dim, cross_attention_dim=cross_dim)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([proj]).to(device=device, dtype=dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers' own IP-Adapter loader sets it
    params = user_branch_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def user_branch_parameters(unet: nn.Module) -> List[nn.Parameter]:
    """The branch's parameters: the projection, then to_k_ip / to_v_ip of every cross-attention layer."""
    layers = _require_branch(unet)
    params = list(unet.encoder_hid_proj.parameters())
    for _, attn in layers:
        params += list(attn.processor.parameters())
    return params


def restrict_user_branch(unet: nn.Module, prefixes: Sequence[str]) -> List[nn.Parameter]:
    """Train the branch only in the cross-attention layers whose names start with one of `prefixes` (all when
    empty): freeze the others' to_k_ip / to_v_ip (to_v_ip is zero there, so those layers stay exact no-ops) and
    return the projection's and the chosen layers' parameters."""
    layers = _require_branch(unet)
    if not prefixes:
        return user_branch_parameters(unet)
    unmatched = [p for p in prefixes if not any(name.startswith(p) for name, _ in layers)]
    if unmatched:
        raise UserBranchError(f"ppd.blocks {unmatched} match no cross-attention layer; this UNet's are "
                              f"{[name[: -len('.processor')] for name, _ in layers]}")
    params = list(unet.encoder_hid_proj.parameters())
    for name, attn in layers:
        chosen = any(name.startswith(p) for p in prefixes)
        attn.processor.requires_grad_(chosen)
        if chosen:
            params += list(attn.processor.parameters())
    return params


def remove_user_branch(unet: nn.Module) -> None:
    """Drop the branch: cross-attention layers get their plain processors back, encoder_hid_proj goes."""
    layers = _require_branch(unet)
    restore = {ip.__name__: base for ip, base in _ip_processor_classes().values()}
    procs = dict(unet.attn_processors)
    for name, attn in layers:
        base = restore[type(attn.processor).__name__]
        procs[name] = base(attention_op=attn.processor.attention_op) if "XFormers" in base.__name__ else base()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None


def set_user_scale(unet: nn.Module, scale: float) -> None:
    """λ in every cross-attention layer. 0 switches the branch off exactly (the processors skip it)."""
    for _, attn in _require_branch(unet):
        attn.processor.scale = [float(scale)]


def get_user_scale(unet: nn.Module) -> float:
    scales = {float(attn.processor.scale[0]) for _, attn in _require_branch(unet)}
    if len(scales) != 1:
        raise UserBranchError(f"the user scale differs between layers ({sorted(scales)}); set one with set_user_scale")
    return scales.pop()


def user_branch_layers(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(processor name, Attention module) of every layer that carries the user branch; an error if none does."""
    return _require_branch(unet)


@contextmanager
def user_branch_disabled(unet: nn.Module, layers: Optional[List[Tuple[str, nn.Module]]] = None) -> Iterator[nn.Module]:
    """The base model for the duration of the block (scale 0, bit-for-bit the UNet without the branch), e.g. as
    PPD's reference ε_ref(x_t, c, t). The UNet still wants `image_embeds`; their values do not matter. `layers`:
    `user_branch_layers(unet)` found once by a caller that switches at every step (each search walks the UNet)."""
    layers = _require_branch(unet) if layers is None else layers
    previous = [list(attn.processor.scale) for _, attn in layers]
    for _, attn in layers:
        attn.processor.scale = [0.0]  # as set_user_scale(unet, 0.0)
    try:
        yield unet
    finally:
        for (_, attn), scale in zip(layers, previous):
            attn.processor.scale = scale


def user_token_shape(unet: nn.Module) -> Tuple[int, int]:
    """(num_tokens, user_dim) that this UNet's user branch takes."""
    layers = _require_branch(unet)
    width = unet.encoder_hid_proj.image_projection_layers[0].ff.net[0].proj.in_features
    return layers[0][1].processor.num_tokens[0], width


def check_user_tokens(unet: nn.Module, user_tokens: torch.Tensor) -> None:
    """Raise a clear error unless `user_tokens` is [B, num_tokens, user_dim] for this UNet's branch."""
    expected_t, expected_d = user_token_shape(unet)
    if user_tokens.dim() != 3 or user_tokens.shape[1:] != (expected_t, expected_d):
        raise ValueError(f"user tokens have shape {tuple(user_tokens.shape)}; this UNet's user branch takes "
                         f"[batch, {expected_t}, {expected_d}]")


def user_added_cond(user_tokens: torch.Tensor, unet: Optional[nn.Module] = None) -> Dict[str, List[torch.Tensor]]:
    """The UNet's `added_cond_kwargs` entry for user tokens [B, T, D_user]: {"image_embeds": [[B, 1, T, D]]}.

    Merge it into the family's added conditioning (SDXL's text_embeds / time_ids stay). With `unet`, the shape is
    checked and the tokens are moved to the projection's device and dtype.
    """
    if user_tokens.dim() != 3:
        raise ValueError(f"user tokens must be [batch, tokens, width]; got shape {tuple(user_tokens.shape)} "
                         "(one user's [tokens, width] needs a batch dimension: tokens[None] or UserTable.tokens)")
    if unet is not None:
        check_user_tokens(unet, user_tokens)
        weight = unet.encoder_hid_proj.image_projection_layers[0].norm.weight
        user_tokens = user_tokens.to(device=weight.device, dtype=weight.dtype)
    # One IP-Adapter ("[...]"), one "image" per sample (the 1): MultiIPAdapterImageProjection's layout.
    return {"image_embeds": [user_tokens.unsqueeze(1)]}


def pipeline_user_embeds(user_tokens: torch.Tensor, negative_user_tokens: Optional[torch.Tensor] = None,
                         do_classifier_free_guidance: bool = True,
                         dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """`ip_adapter_image_embeds` for a diffusers pipeline call with one prompt per user row, in `dtype` (give the
    pipeline's, `pipe.unet.dtype`: diffusers does not cast them, and an fp16 table in an fp32 pipeline fails).

    With guidance the pipeline splits each tensor into (negative, positive) halves. The negative half defaults to
    the same user, so guidance acts on the text alone and the user enters at strength λ; pass other tokens (e.g.
    the null user learned by embedding dropout) to guide on the user too. With several users keep
    num_images_per_prompt=1 (repeat the rows instead): diffusers repeats these embeddings as a whole batch
    (u1, u2, u1, u2) but the prompts row by row (p1, p1, p2, p2), pairing prompts with the wrong users.
    """
    if user_tokens.dim() != 3:
        raise ValueError(f"user tokens must be [batch, tokens, width]; got shape {tuple(user_tokens.shape)}")
    if dtype is not None:
        user_tokens = user_tokens.to(dtype)
        negative_user_tokens = None if negative_user_tokens is None else negative_user_tokens.to(dtype)
    if not do_classifier_free_guidance:
        return [user_tokens.unsqueeze(1)]
    negative = user_tokens if negative_user_tokens is None else negative_user_tokens
    if negative.shape != user_tokens.shape:
        raise ValueError(f"negative user tokens {tuple(negative.shape)} must match {tuple(user_tokens.shape)}")
    return [torch.cat([negative, user_tokens]).unsqueeze(1)]


def user_branch_layout(unet: nn.Module) -> Tuple[int, int, float]:
    """(user_dim, num_tokens, scale) of the branch `unet` carries, read from its modules, not its weights (so
    also from a sharded UNet): what `add_user_branch` needs to give another UNet the same branch."""
    layers = _require_branch(unet)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    return projection.ff.net[0].proj.in_features, int(layers[0][1].processor.num_tokens[0]), get_user_scale(unet)


def user_branch_state_dict(unet: nn.Module) -> Dict[str, torch.Tensor]:
    """The branch in diffusers' single-file IP-Adapter layout: "image_proj.proj.{0,2,3}.*" (the projection) and
    "ip_adapter.{2i+1}.to_{k,v}_ip.weight" for the i-th cross-attention layer. Tensors are detached CPU copies."""
    layers = _require_branch(unet)
    out: Dict[str, torch.Tensor] = {}
    for key, value in unet.encoder_hid_proj.image_projection_layers[0].state_dict().items():
        for ours, theirs in _PROJ_TO_FILE:
            if key.startswith(ours):
                out["image_proj." + theirs + key[len(ours):]] = value
    for i, (_, attn) in enumerate(layers):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = attn.processor.to_k_ip[0].weight
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = attn.processor.to_v_ip[0].weight
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_user_branch(folder: Union[str, os.PathLike], unet: nn.Module, weight_name: str = USER_WEIGHT_NAME) -> Path:
    """Write folder/weight_name (safetensors, via a temporary file and a rename); returns its path."""
    from ..files import save_safetensors_atomic

    layers = _require_branch(unet)
    state = user_branch_state_dict(unet)
    meta = {"user_dim": int(state["image_proj.proj.0.weight"].shape[1]),
            "num_tokens": int(layers[0][1].processor.num_tokens[0]),
            "cross_attention_dim": int(state["image_proj.proj.3.weight"].shape[0]), "layers": len(layers),
            "scale": get_user_scale(unet), "method": "PPD (arXiv 2501.06655), IP-Adapter layout (arXiv 2308.06721)"}
    return save_safetensors_atomic(Path(folder) / weight_name, state,
                                   {"format": "pt", _METADATA_KEY: json.dumps(meta)})


def read_user_branch(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a saved user branch; clear errors for a missing, corrupt or foreign file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no user branch at {path}; save one with save_user_branch(folder, unet)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserBranchError(f"{path} is not a readable safetensors file ({err}); save the branch again") from err
    if _METADATA_KEY not in meta:
        raise UserBranchError(f"{path} has no {_METADATA_KEY!r} metadata, so it was not written by save_user_branch; "
                              "load IP-Adapter files with pipe.load_ip_adapter instead")
    return state, json.loads(meta[_METADATA_KEY])


def load_user_branch(target, folder: Union[str, os.PathLike], weight_name: str = USER_WEIGHT_NAME,
                     scale: Optional[float] = None) -> List[nn.Parameter]:
    """Add the branch saved in folder/weight_name to a UNet (or a pipeline's `.unet`) and load its weights.

    The UNet must not carry a branch yet. The scale is the saved one unless `scale` is given. Returns the branch
    parameters (trainable: pass them to an optimizer to continue training).
    """
    unet = getattr(target, "unet", target)
    state, meta = read_user_branch(Path(folder) / weight_name)
    params = add_user_branch(unet, meta["user_dim"], meta["num_tokens"],
                             scale=meta.get("scale", 1.0) if scale is None else scale)
    ours = user_branch_state_dict(unet)
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        remove_user_branch(unet)
        raise UserBranchError(f"{Path(folder) / weight_name} does not fit this UNet ({meta.get('layers')} layers "
                              f"saved, {len(_cross_attention_layers(unet))} here): missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    _copy_into_branch(unet, state)
    return params


def _copy_into_branch(unet: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    proj_state = {}
    for key in proj.state_dict():
        ours, theirs = next((o, t) for o, t in _PROJ_TO_FILE if key.startswith(o))
        proj_state[key] = state["image_proj." + theirs + key[len(ours):]]
    proj.load_state_dict(proj_state)
    with torch.no_grad():
        for i, (_, attn) in enumerate(_cross_attention_layers(unet)):
            attn.processor.to_k_ip[0].weight.copy_(state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
            attn.processor.to_v_ip[0].weight.copy_(state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])


__all__ = [
    "USER_WEIGHT_NAME", "UserBranchError", "add_user_branch", "check_user_tokens", "get_user_scale",
    "has_user_branch", "load_user_branch", "pipeline_user_embeds", "read_user_branch", "remove_user_branch",
    "save_user_branch", "set_user_scale", "user_added_cond", "user_branch_disabled", "user_branch_layers",
    "user_branch_parameters", "user_branch_state_dict", "user_token_shape",
]
