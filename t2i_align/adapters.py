"""Adapters on the UNet: LoRA through diffusers' PEFT integration, what trains (LoRA or every weight), the frozen
full-fine-tune reference, and the base model as the same UNet with every adapter off."""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Iterator, List

import torch

from t2i_align.config import LoraConfig
from t2i_align.models import ModelLoadError


def add_lora(unet: torch.nn.Module, cfg: LoraConfig) -> List[torch.nn.Parameter]:
    """Add a peft LoRA adapter to the UNet through diffusers' PEFT integration and freeze everything else.

    Using `unet.add_adapter` (not peft.get_peft_model) keeps the UNet a diffusers model, so diffusers' LoRA
    saving and `pipe.load_lora_weights` work on the result. Both inits leave B = 0: the output is unchanged.
    Returns the trainable (LoRA) parameters.
    """
    from peft import LoraConfig as PeftLoraConfig

    inits = {"gaussian": "gaussian", "default": True}
    if cfg.init not in inits:
        raise ValueError(f"unknown lora.init={cfg.init!r}; use one of {sorted(inits)}")
    peft_config = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=cfg.dropout,
        init_lora_weights=inits[cfg.init], target_modules=list(cfg.target_modules),
    )
    _check_targets(unet, cfg.target_modules)
    unet.requires_grad_(False)
    try:
        unet.add_adapter(peft_config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ModelLoadError(f"lora.target_modules={list(cfg.target_modules)} did not fit the UNet: {err}") from err
    trainable = [p for name, p in unet.named_parameters() if "lora_" in name]
    for param in trainable:
        param.requires_grad_(True)
    return trainable


def _check_targets(unet: torch.nn.Module, targets) -> None:
    """Every lora.target_modules entry names layers (as peft matches a list: the name, or its last dotted parts):
    peft skips an entry that matches nothing as long as another matches, so a misspelt one trained a smaller LoRA
    than configured, silently."""
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelLoadError(f"lora.target_modules: {missing} match no layer of the UNet (misspelt? e.g. to_q, "
                             "to_k, to_v, to_out.0, proj_in, conv1, conv2, ff.net.2)")


def check_targets_in_folder(folder, targets) -> None:
    """The dry run's `_check_targets`: on the folder's UNet built from its config on the meta device (no weights,
    about a second for SDXL), so a misspelt target is found before minutes of loading."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
    with init_empty_weights():
        _check_targets(UNet2DConditionModel.from_config(config), targets)


def trainable_parameters(unet: torch.nn.Module, cfg: LoraConfig) -> List[torch.nn.Parameter]:
    """LoRA parameters when cfg.enabled (adding the adapter), otherwise every UNet parameter (full fine-tune)."""
    if cfg.enabled:
        return add_lora(unet, cfg)
    unet.requires_grad_(True)
    return list(unet.parameters())


def frozen_reference(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Full fine-tune reference: a frozen copy of the policy UNet in the weight dtype (never the policy itself).
    torch's own Module.to: diffusers' warns on every cast of a UNet that keeps no module in float32 (the list it
    names is empty), which read as a problem in every full fine-tune's log."""
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    return torch.nn.Module.to(frozen, dtype=dtype)


@contextmanager
def adapters_off(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model for the block: the same UNet, EVERY adapter off (LoRA; PPD's user branch), autograd off."""
    from t2i_align.conditioning.users import has_user_branch, user_branch_disabled

    lora = bool(getattr(unet, "peft_config", None))  # disable_adapters() fails on a UNet without peft adapters
    if lora:
        unet.disable_adapters()
    try:
        with torch.no_grad(), (user_branch_disabled(unet) if has_user_branch(unet) else nullcontext()):
            yield unet
    finally:
        if lora:
            unet.enable_adapters()


@contextmanager
def visiting(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """`module` moved to `device` for the block and back home afterwards (also on an error).

    The offloaded reference (`train.offload_reference`) lives on the CPU between uses: each reference call
    (`references`) and the gallery's base column, which a diffusers pipeline samples on its accelerator device
    where the VAE and text encoders are, bring it over. Only the device changes: the copy is already in the weight
    dtype, the dtype of the text encoders whose embeddings it receives.
    """
    home = next(module.parameters()).device
    if home == torch.device(device):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
