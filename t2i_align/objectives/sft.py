"""Supervised fine-tuning: the plain denoising loss on chosen images (Diffusion-DPO's `--sft` baseline, RAFT)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from t2i_align import diffusion
from t2i_align.config import ObjectiveConfig
from t2i_align.objectives.base import Denoiser, ImageBatch, Metrics, Objective, PairBatch, metrics_to_floats


def preferred_images(batch: Union[ImageBatch, PairBatch]) -> ImageBatch:
    """A PairBatch trains on its preferred images only (the official `--sft` flag), so DPO and SFT can be
    compared on the same pair data; the rejected images are ignored."""
    if isinstance(batch, PairBatch):
        return ImageBatch(batch.latents_w, batch.embeds, batch.time_ids_w, batch.dropped_captions)
    if isinstance(batch, ImageBatch):
        return batch
    raise TypeError(f"SFT needs an ImageBatch or a PairBatch, got {type(batch).__name__}")


class SFT(Objective):
    """L = E_{x_0, ε, t} ‖target - f_θ(x_t, t, c)‖² / (C·h·w), the DDPM simple loss (Ho et al. 2020, Eq. 14)
    with target ε or v (diffusion.training_target), computed in fp32 as the official code's
    `F.mse_loss(model_pred.float(), target.float())`. No reference model. With objective.snr_gamma > 0 each
    sample's MSE is weighted by min-SNR-γ (`diffusion.min_snr_weights`, as RAFT's released script and diffusers'
    `--snr_gamma` offer); "mse" then logs the unweighted mean."""

    needs_reference = False
    batch_kind = "images"

    def compute_loss(self, policy: Denoiser, reference: Optional[Denoiser], batch: Union[ImageBatch, PairBatch],
                     scheduler: object, cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, Metrics]:
        self.check_reference(policy, reference)
        images = preferred_images(batch)
        latents = images.latents
        noisy, timesteps, target = diffusion.noised(scheduler, latents, generator, **cfg.noising)
        mse = diffusion.per_sample_mse(policy(noisy, timesteps, images.embeds, images.time_ids), target)
        if not cfg.snr_gamma:
            loss = mse.mean()  # equal-sized samples: the same as the mean over every element
            return loss, metrics_to_floats({"loss": loss, "mse": loss})
        loss = (mse * diffusion.min_snr_weights(scheduler, timesteps, cfg.snr_gamma)).mean()  # diffusers' order
        return loss, metrics_to_floats({"loss": loss, "mse": mse.mean()})
