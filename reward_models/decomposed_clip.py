"""LongAlign's decomposed, reweighted CLIP preference score (Liu et al., "Improving Long-Text Alignment for
Text-to-Image Diffusion Models", ICLR 2025, arXiv 2410.11817; code github.com/luping-liu/LongAlign, `loss.py::
dense_score` with `do_ortho=True`).

Text side (no_grad): the prompt is split into sentences s_k, each encoded and L2-normalised to t_k (truncated to
the text context on its own), and t = mean_k t_k, *not* re-normalised. Image side (differentiable): x, the
normalised image embedding. With v the unit common text direction and η = t·v:

    t = η v + t⊥,          S = t·x = t⊥·x + η (v·x)          (total = text-relevant + text-irrelevant)
    S_ω = t⊥·x + ω η (v·x)                                    (ω = 0.3 in the paper; ω = 1 gives S)

v is, as in the released code, `normalize(mean over the batch of t)` (so with a batch of one prompt t⊥ = 0 and
S_ω = ω S), or fixed: estimated once from a prompt set with `fit_direction` and saved / loaded as safetensors.
Scores are the raw cosine-like values (no logit scale, as in the code), times `scale` (default 1; the paper's
tables report 100·S). Any CLIP loadable by `clip.load_open_clip` serves as the backbone: Denscore
(hf.co/luping-liu/Denscore, a transformers CLIPModel folder), PickScore, HPSv2, or "toy" for the toy CLIP.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import PathLike, Reward, RewardOutput, register, require_path
from .clip import Arch, load_open_clip

SOURCE = ("a CLIP backbone: a local copy of https://huggingface.co/luping-liu/Denscore (transformers CLIPModel "
          "folder, as in LongAlign), any folder or file `clip` accepts (with arch=...), or checkpoint='toy'")


def split_sentences(text: str) -> List[str]:
    """Sentences ending in . ! ? or ; followed by whitespace (LongAlign's regex, fixed as the reference advises:
    the released one misses plain ! and ; and splits decimals). No sentence -> the whole text, even if empty."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?;])\s+", text.strip())]
    return [p for p in parts if p] or [text]


def decompose(t: torch.Tensor, v: torch.Tensor, x: torch.Tensor, omega: float) -> Dict[str, torch.Tensor]:
    """The LongAlign split of S = t·x for text vectors t [B, D], unit direction v [D], image embeddings x [B, D].

    Computed in float64, so `total - (relevant + irrelevant)` is at rounding level (~1e-16) and ω = 1 reproduces
    the total. Returns total, relevant (t⊥·x), irrelevant (η v·x), eta and weighted (relevant + ω·irrelevant).
    """
    t, v, x = t.double(), F.normalize(v.double(), dim=0), x.double()  # unit v in float64: t⊥ ⟂ v exactly
    eta = t @ v
    t_perp = t - eta[:, None] * v[None]
    relevant = (t_perp * x).sum(-1)
    irrelevant = eta * (x @ v)
    return {"total": (t * x).sum(-1), "relevant": relevant, "irrelevant": irrelevant, "eta": eta,
            "weighted": relevant + omega * irrelevant}


@register("decomposed-clip")
class DecomposedClip(Reward):
    """S_ω = t⊥·x + ω η (v·x) (see the module docstring); `scores` are S_ω · scale, float32, differentiable."""

    differentiable = True

    def __init__(self, checkpoint: Optional[PathLike] = None, arch: Optional[Arch] = None, omega: float = 0.3,
                 direction: Optional[PathLike] = None, split: bool = True, scale: float = 1.0, device=None,
                 dtype=None, batch_size: int = 32):
        self.encoder = load_open_clip(arch, checkpoint, "decomposed-clip weights", SOURCE, device=device,
                                      dtype=dtype, batch_size=batch_size)
        self.omega, self.split, self.scale = float(omega), bool(split), float(scale)
        self.direction: Optional[torch.Tensor] = None
        self._fitted_on: Optional[int] = None
        if direction is not None:
            self.load_direction(direction)

    def text_vectors(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, List[bool]]:
        """t per prompt (mean of L2-normalised sentence embeddings) and whether any of its sentences was cut."""
        segments = [split_sentences(p) if self.split else [p] for p in prompts]
        owner = torch.tensor([i for i, segs in enumerate(segments) for _ in segs], device=self.encoder.device)
        feats, cut = self.encoder.encode_texts([s for segs in segments for s in segs])
        sums = torch.zeros(len(prompts), feats.shape[1], device=feats.device).index_add_(0, owner, feats)
        counts = torch.bincount(owner, minlength=len(prompts)).clamp(min=1)
        truncated = [False] * len(prompts)
        for i, c in zip(owner.tolist(), cut):
            truncated[i] = truncated[i] or c
        return sums / counts[:, None].to(sums.dtype), truncated

    def fit_direction(self, prompts: Sequence[str]) -> torch.Tensor:
        """v = normalize(mean_p t(p)) over a prompt set; kept and used instead of the batch statistic."""
        if not prompts:
            raise ValueError("fit_direction needs at least one prompt")
        t, _ = self.text_vectors(list(prompts))
        self.direction = F.normalize(t.mean(0), dim=0)
        self._fitted_on = len(prompts)
        return self.direction

    def save_direction(self, path: PathLike) -> None:
        from safetensors.torch import save_file

        if self.direction is None:
            raise ValueError("no fixed direction to save: call fit_direction(prompts) first")
        meta = {"omega": str(self.omega), "num_prompts": str(self._fitted_on or "")}
        save_file({"direction": self.direction.detach().float().cpu().contiguous()}, str(path), metadata=meta)

    def load_direction(self, path: PathLike) -> torch.Tensor:
        from safetensors.torch import load_file

        what = "decomposed-clip common direction"
        v = load_file(str(require_path(path, what, "a file written by DecomposedClip.save_direction")))["direction"]
        dim = self.encoder.encode_texts([""])[0].shape[-1]
        if v.shape != (dim,):
            raise ValueError(f"{what} in {path} has shape {tuple(v.shape)}, the model's embeddings are {dim}-d")
        self.direction = F.normalize(v.float(), dim=0).to(self.encoder.device)
        return self.direction

    def score(self, images, prompts: List[str]) -> RewardOutput:
        t, truncated = self.text_vectors(prompts)
        v = self.direction if self.direction is not None else F.normalize(t.mean(0), dim=0)
        parts = decompose(t, v, self.encoder.encode_images(images), self.omega)
        info = {k: (parts[k] * (1.0 if k == "eta" else self.scale)).detach().float().tolist()
                for k in ("total", "relevant", "irrelevant", "eta")}
        info.update(truncated=sum(truncated), direction="fixed" if self.direction is not None else "batch",
                    omega=self.omega)
        return (self.scale * parts["weighted"]).float(), info
