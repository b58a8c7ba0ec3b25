"""Where the shipped toy-world assets live, and their integrity check."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def pipeline_dir() -> Path:
    """The shipped tiny Stable Diffusion pipeline (genuine diffusers format)."""
    return ASSETS_DIR / "pipeline"


def clip_dir() -> Path:
    """The shipped toy open_clip model (config JSON + safetensors weights)."""
    return ASSETS_DIR / "toy_clip"
