"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341; github.com/tgxs002/HPSv2).

An open_clip ViT-H-14 fine-tuned on HPD v2. The official checkpoints (hf.co/xswu/HPSv2: `HPS_v2_compressed.pt`,
`HPS_v2.1_compressed.pt`) are `{"state_dict": <open_clip CLIP keys>}`, loaded here with
`torch.load(weights_only=True)` and a key check. Score, as `hpsv2/img_score.py`: the raw cosine
`image_features @ text_features.T` of the normalised features (about 0.2-0.35; no logit scale).
Preprocessing: the official one, not CLIP's (`resize_longest_pad`: the longest side -> 224 and zero padding, no
crop), OpenAI mean/std, as torch ops (differentiable).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from .base import PathLike, Reward, RewardOutput, RewardSetupError, register
from .clip import Arch, load_open_clip

_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def resize_longest_pad(x: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """HPSv2's evaluation resize on [B, C, H, W] images in [0, 1]; no crop, so nothing of the image is lost.

    The official scorer (hpsv2 1.2.0 `img_score.py`: `create_model_and_transforms(..., light_augmentation=True)`,
    whose `preprocess_val` is open_clip's `image_transform(..., resize_longest_max=True)` in HPSv2's copy) runs, in
    this order: convert to RGB -> ToTensor ([0, 1]) -> ResizeMaxSize(size, fill=0) -> Normalize(OpenAI mean/std).
    ResizeMaxSize scales the LONGEST side to `size` (bicubic; the other side becomes round(side · size / longest),
    Python's round) and pads with 0 to size x size, left / top getting half the padding rounded down and right /
    bottom the rest. The padding is 0 in [0, 1] space, i.e. BEFORE normalisation: padded pixels reach the model
    as -mean/std, not 0. This function is the ResizeMaxSize step; `preprocess_images` normalises afterwards.

    Two deliberate details: the resize is antialiased (torchvision >= 0.17 does so for tensors by default), and an
    image whose longest side already equals `size` is still padded to a square (the official code skips the pad
    then, handing the ViT a non-square image it cannot take).
    """
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))  # a banner over 448:1 keeps one line, not 0
    if (nh, nw) != (h, w):
        aa = interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=aa,
                          **({"align_corners": False} if aa else {}))
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(x, (left, size - nw - left, top, size - nh - top), value=0.0)


@register("hpsv2")
class HPSv2(Reward):
    """cos(E_img(x), E_txt(p)) with the HPSv2 weights. `version` only picks the file named in errors."""

    differentiable = True
    paths = {"checkpoint": "HPS_v2.1_compressed.pt (version=v2.0: HPS_v2_compressed.pt) from "
                           "https://huggingface.co/xswu/HPSv2, passed as checkpoint=PATH"}
    open_clip_checkpoint = False  # no open_clip tag holds HPSv2's weights

    def __init__(self, checkpoint: Optional[PathLike] = None, arch: Arch = "ViT-H-14", version: str = "v2.1",
                 device=None, dtype=None, batch_size: int = 16):
        if version not in _FILES:
            raise RewardSetupError(f"hpsv2 version must be one of {sorted(_FILES)}, got {version!r}")
        source = (f"{_FILES[version]} from https://huggingface.co/xswu/HPSv2 (`hf download xswu/HPSv2 "
                  f"{_FILES[version]} --local-dir DIR`), passed as checkpoint=DIR/{_FILES[version]}")
        self.version = version
        if checkpoint is not None and Path(checkpoint).is_dir():  # PickScore's or CLIP's weights scored as HPSv2
            raise RewardSetupError(f"hpsv2 checkpoint {checkpoint} is a folder, but HPSv2's weights ship as one file: "
                                   f"a folder holds other CLIP weights (PickScore's, CLIP's), which would be scored "
                                   f"under HPSv2's name; give {source.split(', passed as')[0]} (for a plain CLIP "
                                   "folder, use the clip reward)")
        self.encoder = load_open_clip(arch, checkpoint, f"hpsv2 ({version}) weights", source, pretrained_tags=False,
                                      device=device, dtype=dtype, batch_size=batch_size, resize=resize_longest_pad)

    def score(self, images, prompts: List[str]) -> RewardOutput:
        text, truncated = self.encoder.encode_texts(prompts)
        cosine = (self.encoder.encode_images(images) * text).sum(-1)
        return cosine, {"truncated": sum(truncated)}
