"""LAION aesthetic predictor v2 (Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor).

CLIP ViT-L/14 (OpenAI) image embedding, L2-normalised, into a linear MLP with no activations,
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts 0.2 / 0.2 / 0.1 (inactive at eval); the head's official file
`sac+logos+ava1-l14-linearMSE.pth` is a state_dict of `layers.*` keys (Linear layers at indices 0, 2, 4, 6, 7).
Score: the MLP output, roughly 1-10. Prompts are ignored (only their count is checked). Differentiable.
The older linear head of LAION-AI/aesthetic-predictor (`sa_0_4_vit_l_14_linear.pth`, one `nn.Linear(768, 1)`
with `weight` / `bias` keys, the scorer of the RAFT diffusion demo) loads too.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .base import PathLike, Reward, RewardOutput, load_checked, load_state_dict_file, register, require_path
from .clip import Arch, load_open_clip

HEAD_SOURCE = ("sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-"
               "predictor (file in the repository root), passed as head=PATH")
CLIP_SOURCE = ("OpenAI CLIP ViT-L/14 weights in open_clip layout, e.g. open_clip_model.safetensors from "
               "https://huggingface.co/timm/vit_large_patch14_clip_224.openai (arch='ViT-L-14-quickgelu'), a "
               "transformers folder of https://huggingface.co/openai/clip-vit-large-patch14, or checkpoint='openai'")


class AestheticHead(nn.Module):
    """`MLP.layers` of improved-aesthetic-predictor's simple_inference.py (the ReLUs are commented out there)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _head_for(state, path) -> nn.Module:
    """The MLP head (`layers.*` keys) or the linear head (`weight` [1, D], `bias`)."""
    if "layers.0.weight" in state:
        return AestheticHead(state["layers.0.weight"].shape[1])
    weight = state.get("weight")
    if weight is not None and weight.dim() == 2 and weight.shape[0] == 1:
        return nn.Linear(weight.shape[1], 1)
    raise ValueError(f"{path} is not an aesthetic head: expected layers.0.weight (MLP head) or a [1, D] weight "
                     f"(linear head), found keys {sorted(state)[:8]}")


@register("aesthetic")
class Aesthetic(Reward):
    """MLP(normalize(E_img(x))) with the LAION head. `checkpoint` is the CLIP image tower's weights."""

    differentiable = True
    paths = {"head": HEAD_SOURCE, "checkpoint": CLIP_SOURCE}
    open_clip_checkpoint = True

    def __init__(self, head: Optional[PathLike] = None, checkpoint: Optional[PathLike] = None,
                 arch: Optional[Arch] = None, device=None, dtype=None, batch_size: int = 32):
        state = load_state_dict_file(require_path(head, "aesthetic head weights", HEAD_SOURCE))
        self.head = _head_for(state, head)
        load_checked(self.head, state, str(head))
        # the official predictor crops as OpenAI CLIP's torchvision CenterCrop (its offset rounded), also on a
        # transformers folder, whose processor's crop starts at (n - 224) // 2; the rest as the checkpoint says
        self.encoder = load_open_clip(arch, checkpoint, "aesthetic CLIP weights", CLIP_SOURCE, device=device,
                                      dtype=dtype, batch_size=batch_size, floor_offset=False,
                                      default_arch="ViT-L-14-quickgelu")  # a file's or tag's; a folder names its own
        embed_dim = self.encoder.encode_texts([""])[0].shape[-1]
        wanted = next(self.head.parameters()).shape[1]
        if embed_dim != wanted:
            raise ValueError(f"aesthetic head {head} expects {wanted}-d CLIP features but "
                             f"the CLIP model gives {embed_dim}-d (the official head needs ViT-L-14)")
        self.head = self.head.to(self.encoder.device).eval().requires_grad_(False)

    def score(self, images, prompts: List[str]) -> RewardOutput:
        features = self.encoder.encode_images(images)
        return self.head(features).squeeze(-1), {}
