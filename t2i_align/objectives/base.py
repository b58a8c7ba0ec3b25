"""What every objective sees: denoiser closures, batches, and the `Objective` interface the loop calls.

The loop builds the denoisers (policy: with gradients; reference: under no_grad, LoRA adapters disabled or a
frozen copy), so an objective never knows whether the UNet is SD1.5 or SDXL, LoRA or fully fine-tuned.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from t2i_align.conditioning.text import PromptEmbeds
from t2i_align.config import ObjectiveConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds, Optional[torch.Tensor]], torch.Tensor]
"""(noisy latents [N,C,h,w], timesteps [N], prompt embeds (N rows), SDXL time ids [N,6] or None) -> prediction."""

Metrics = Dict[str, float]


@dataclass
class PairBatch:
    """B preference pairs: the preferred (w) and the rejected (l) image of the same prompt."""

    latents_w: torch.Tensor
    """[B, C, h, w] VAE latents of the preferred images, already multiplied by the VAE scaling factor."""
    latents_l: torch.Tensor
    """[B, C, h, w] latents of the rejected images, same scaling."""
    embeds: PromptEmbeds
    """Prompt embeddings, B rows (one prompt per pair)."""
    time_ids_w: Optional[torch.Tensor] = None
    """SDXL micro-conditioning [B, 6] of the preferred images; None for SD1.5."""
    time_ids_l: Optional[torch.Tensor] = None
    """SDXL micro-conditioning [B, 6] of the rejected images (data.time_ids=per_image: their own size and crop)."""
    dropped_captions: Tuple[Tuple[int, str], ...] = ()
    """(row, caption) of the rows whose caption data.prompt_dropout blanked in `embeds`."""


@dataclass
class ImageBatch:
    """B images with their prompts (SFT on preferred images, RAFT's selected samples)."""

    latents: torch.Tensor
    """[B, C, h, w] scaled VAE latents."""
    embeds: PromptEmbeds
    """Prompt embeddings, B rows."""
    time_ids: Optional[torch.Tensor] = None
    """SDXL micro-conditioning [B, 6]; None for SD1.5."""
    dropped_captions: Tuple[Tuple[int, str], ...] = ()
    """(row, caption) of the rows whose caption data.prompt_dropout blanked in `embeds`."""


@dataclass
class PromptBatch:
    """B prompts and nothing else (reward-gradient methods generate their own images: LongAlign stage 2)."""

    captions: List[str]
    """The prompts as text (rewards read them)."""
    embeds: PromptEmbeds
    """Their embeddings in the run's text encoding, B rows."""
    time_ids: Optional[torch.Tensor] = None
    """SDXL micro-conditioning [B, 6] for generating at the training resolution, uncropped; None for SD1.5."""

    def __len__(self) -> int:
        return len(self.captions)


class Objective(abc.ABC):
    """A training method: one loss over one kind of batch. The loop looks it up by name and never branches on it."""

    needs_reference: bool = False
    """Whether `compute_loss` needs the reference denoiser (the loop builds one only then)."""
    batch_kind: str = "images"
    """"pairs" (PairBatch), "images" (ImageBatch) or "prompts" (PromptBatch): which batches the loop must build."""
    runs_sharded: bool = True
    """Whether it runs under FSDP (t2i_align.engine_checks.check_fsdp): SePPO's snapshot references do not."""
    ctx = None
    """The ObjectiveContext handed over by `setup` (None until then)."""

    def configure(self, cfg) -> "Objective":
        """Called by the loop before it builds anything, with the run's Config: settings that decide what it
        builds (RewardBackprop needs a reference only with a KL weight). Returns self."""
        return self

    def setup(self, ctx) -> None:
        """Called once by the loop before training, with the `ObjectiveContext` (encoders, sampler, rewards)."""
        self.ctx = ctx

    def reference_provider(self, ctx):
        """Who plays the reference over training (t2i_align.references): the base model by default, None when
        the objective needs none. SePPO returns a snapshot pool."""
        if not self.needs_reference:
            return None
        from t2i_align.references import BaseReference

        return BaseReference(ctx.unet, ctx.components, ctx.lora, ctx.frozen)

    @abc.abstractmethod
    def compute_loss(self, policy: Denoiser, reference: Optional[Denoiser], batch: object, scheduler: object,
                     cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, Metrics]:
        """(scalar loss with gradients to the policy, metrics as python floats)."""

    def check_reference(self, policy: Denoiser, reference: Optional[Denoiser]) -> None:
        """Fail early on a missing reference, or on the policy passed as its own reference (a silent no-op
        loss: align-anything PR #53, "training model and reference model should be different models")."""
        if reference is not None and reference is policy:
            raise ValueError("reference must not be the policy: pass a frozen copy, or the same UNet with its "
                             "LoRA adapters disabled under no_grad")
        if self.needs_reference and reference is None:
            raise ValueError(f"{type(self).__name__} needs a reference denoiser, got None")


def metrics_to_floats(values: Dict[str, torch.Tensor]) -> Metrics:
    """Detached scalar tensors -> python floats with a single device sync (one stack, one tolist)."""
    names = list(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    return dict(zip(names, stacked.cpu().tolist()))
