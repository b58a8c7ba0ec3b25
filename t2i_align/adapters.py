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


def adapters_off(unet: torch.nn.Module):
    """The base model for the block: the same UNet, EVERY adapter off (LoRA; PPD's user branch), dropout off,
    autograd off."""
    return BaseSwitch(unet).off()


class BaseSwitch:
    """Turns a UNet into its base model and back, at every training step (the adapter reference). The layers it
    touches are found once: diffusers' disable_adapters/enable_adapters and Module.eval/train walk the UNet's
    ~2,000 modules at each call, 17 ms of host time per step on CPU (benchmarks/step_host.py). So the UNet must
    not gain or lose adapters after the switch is made."""

    def __init__(self, unet: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from t2i_align.conditioning.users import has_user_branch, user_branch_layers

        self.unet = unet
        lora = bool(getattr(unet, "peft_config", None))  # as diffusers' disable_adapters() requires
        self.lora = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)] if lora else []
        self.user = user_branch_layers(unet) if has_user_branch(unet) else None  # PPD's
        # All that train mode changes in a diffusers UNet with plain LoRA. Left as trained: ResnetBlock2D's
        # .contiguous() (only rounding; kept, the reference at LoRA B = 0 is the policy bit for bit); peft's
        # variants that read module.training (DoRA...) are not offered
        self.dropouts = [m for m in unet.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]

    @contextmanager
    def off(self) -> Iterator[torch.nn.Module]:
        """The base model: every adapter off, dropout off, autograd off."""
        from t2i_align.conditioning.users import user_branch_disabled

        try:
            for layer in self.lora:
                layer.enable_adapters(False)
            with self.deterministic(), torch.no_grad(), \
                    (nullcontext() if self.user is None else user_branch_disabled(self.unet, self.user)):
                yield self.unet
        finally:
            for layer in self.lora:
                layer.enable_adapters(True)

    @contextmanager
    def deterministic(self) -> Iterator[torch.nn.Module]:
        """Dropout off for the block (Module.eval's effect), each dropout's mode restored afterwards."""
        modes = [m.training for m in self.dropouts]
        for m in self.dropouts:
            m.training = False
        try:
            yield self.unet
        finally:
            for m, mode in zip(self.dropouts, modes):
                m.training = mode


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
