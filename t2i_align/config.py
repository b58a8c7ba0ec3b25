"""Typed configuration: one dataclass per concern, loaded from YAML with dotted overrides.

(Initial field list; the loading machinery is being written.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelConfig:
    pretrained: str = "toy"
    """Local diffusers folder (with model_index.json), "toy" for the shipped toy pipeline, or a hub id
    (only when a network exists)."""
    family: str = "auto"
    """Model family: "auto" (read model_index.json), "sd15" or "sdxl"."""
    revision: Optional[str] = None
    """Hub revision; ignored for local folders."""
    variant: Optional[str] = None
    """Weight variant to load, e.g. "fp16" for *.fp16.safetensors files."""
    vae: Optional[str] = None
    """Optional separate VAE folder (e.g. an fp16-safe SDXL VAE)."""
    weight_dtype: str = "fp32"
    """dtype of frozen weights (VAE, text encoders, reference UNet): "fp32", "fp16" or "bf16"."""
    attention: str = "sdpa"
    """Attention backend: "sdpa" (PyTorch scaled_dot_product_attention, default) or "xformers"."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the trained UNet."""
    channels_last: bool = False
    """Use channels_last memory format for the UNet (faster convolutions on recent GPUs)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters on the UNet instead of all its weights."""
    rank: int = 8
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha; scaling is alpha / rank. None means alpha = rank."""
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get adapters (attention projections by default, as in the diffusers scripts)."""
    init: str = "gaussian"
    """peft init_lora_weights: "gaussian" or "default" (both leave B = 0, so the model is unchanged at init)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
