"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341; github.com/tgxs002/HPSv2).

An open_clip ViT-H-14 fine-tuned on HPD v2. The official checkpoints (hf.co/xswu/HPSv2: `HPS_v2_compressed.pt`,
`HPS_v2.1_compressed.pt`) are `{"state_dict": <open_clip CLIP keys>}`, loaded here with
`torch.load(weights_only=True)` and a key check. Score, as `hpsv2/img_score.py`: the raw cosine
`image_features @ text_features.T` of the normalised features (about 0.2-0.35; no logit scale).
Preprocessing: shortest side -> 224 bicubic, centre crop, OpenAI mean/std, as torch ops (differentiable).
"""
from __future__ import annotations

from typing import List, Optional

from .base import PathLike, Reward, RewardOutput, register
from .clip import Arch, load_open_clip

_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register("hpsv2")
class HPSv2(Reward):
    """cos(E_img(x), E_txt(p)) with the HPSv2 weights. `version` only picks the file named in errors."""

    differentiable = True

    def __init__(self, checkpoint: Optional[PathLike] = None, arch: Arch = "ViT-H-14", version: str = "v2.1",
                 device=None, dtype=None, batch_size: int = 16):
        if version not in _FILES:
            raise ValueError(f"hpsv2 version must be one of {sorted(_FILES)}, got {version!r}")
        source = (f"{_FILES[version]} from https://huggingface.co/xswu/HPSv2 (`huggingface-cli download xswu/HPSv2 "
                  f"{_FILES[version]} --local-dir DIR`), passed as checkpoint=DIR/{_FILES[version]}")
        self.version = version
        self.encoder = load_open_clip(arch, checkpoint, f"hpsv2 ({version}) weights", source, device=device,
                                      dtype=dtype, batch_size=batch_size)

    def score(self, images, prompts: List[str]) -> RewardOutput:
        text, truncated = self.encoder.encode_texts(prompts)
        cosine = (self.encoder.encode_images(images) * text).sum(-1)
        return cosine, {"truncated": sum(truncated)}
