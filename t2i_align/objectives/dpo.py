"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), with its sigmoid, hinge and IPO losses."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from t2i_align import diffusion
from t2i_align.config import ObjectiveConfig
from t2i_align.objectives.base import Denoiser, Metrics, Objective, PairBatch, metrics_to_floats

_SCALE = {"official": 0.5, "diffusers": 1.0}


def dpo_loss(model_mse_w: torch.Tensor, model_mse_l: torch.Tensor, ref_mse_w: torch.Tensor,
             ref_mse_l: torch.Tensor, beta: float, beta_convention: str = "official",
             loss_type: str = "sigmoid") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO losses [B] and logits z [B] from per-sample MSEs (mean over latent elements).

    Wallace et al. 2023, Eq. 14, as the official code implements it (T·ω(λ_t) folded into β):

        margin h = (ref_w - ref_l) - (mse_w - mse_l)      > 0 when the policy favours the winner more than ref
        z = s·h,  s = ½·β ("official": the ½ of the Gaussian log-likelihood)  or  s = β ("diffusers": its SD1.5 script)

    so official β = 5000 and diffusers' SD1.5 β = 2500 give the same z (its SDXL script has the ½: "official").
    Losses per pair (the caller takes the mean AFTER them, not logsigmoid(mean z), the bug of diffusers#6702):

    - "sigmoid" (DPO, Rafailov et al. 2023, Eq. 7): -log σ(z). Gradient weight σ(-z); at z = 0 the loss is ln 2.
    - "hinge" (SLiC-HF, Zhao et al. 2023; RSO, Liu et al. 2023): max(0, 1 - z), i.e. the margin s·h must
      reach 1. Same as diffusers' `relu(1 - beta_dpo * logits)`.
    - "ipo" (Azar et al. 2023, Eq. 17): (h - 1/(2s))², regressing the unscaled margin onto 1/(2s) with s in
      the role of IPO's τ: official β = 5000 targets h = 2·10⁻⁴. This is the diffusers port's form with its
      nonexistent `args.beta` read as its β; it equals ((z - ½)/s)², so both conventions agree in value too.
    """
    if beta_convention not in _SCALE:
        raise ValueError(f"unknown beta_convention {beta_convention!r}; use one of {sorted(_SCALE)}")
    scale = _SCALE[beta_convention] * float(beta)
    margin = (ref_mse_w - ref_mse_l) - (model_mse_w - model_mse_l)
    logits = scale * margin
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - logits)
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * scale)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use sigmoid, hinge or ipo")
    return losses, logits


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs the implicit reward ranks correctly (z > 0); exact ties z = 0 count ½ (diffusers)."""
    return (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()


def _pair_time_ids(batch: PairBatch) -> Optional[torch.Tensor]:
    """[w; l] time ids (as data.time_ids sets them: by default the same for both), or None for SD1.5."""
    if batch.time_ids_w is None and batch.time_ids_l is None:
        return None
    if batch.time_ids_w is None or batch.time_ids_l is None:
        raise ValueError("PairBatch has time ids for only one side; SDXL needs time_ids_w and time_ids_l")
    return torch.cat([batch.time_ids_w, batch.time_ids_l])


class DPO(Objective):
    """Diffusion-DPO: winners and losers as ONE [w; l] batch with the same ε and t for both images of a pair."""

    needs_reference = True
    batch_kind = "pairs"

    def compute_loss(self, policy: Denoiser, reference: Optional[Denoiser], batch: PairBatch, scheduler: object,
                     cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, Metrics]:
        self.check_reference(policy, reference)
        if not isinstance(batch, PairBatch):
            raise TypeError(f"DPO needs a PairBatch, got {type(batch).__name__}")
        lw, ll = batch.latents_w, batch.latents_l
        if lw.shape != ll.shape:
            raise ValueError(f"winner latents {tuple(lw.shape)} and loser latents {tuple(ll.shape)} differ")
        latents = torch.cat([lw, ll])
        # (ε, t) shared per pair, so the MSE difference measures the images, not the draws
        noisy, timesteps, target = diffusion.noised(scheduler, latents, generator, repeats=2, **cfg.noising)
        embeds, time_ids = batch.embeds.repeat(2), _pair_time_ids(batch)

        model_mse = diffusion.per_sample_mse(policy(noisy, timesteps, embeds, time_ids), target)
        with torch.no_grad():
            ref_mse = diffusion.per_sample_mse(reference(noisy, timesteps, embeds, time_ids).detach(), target)
        mse_w, mse_l = model_mse.chunk(2)
        ref_w, ref_l = ref_mse.chunk(2)
        losses, logits = dpo_loss(mse_w, mse_l, ref_w, ref_l, cfg.beta, cfg.beta_convention, cfg.loss_type)
        loss = losses.mean() + cfg.sft_weight * mse_w.mean()  # RPO-style anchor on the winners (config doc)
        metrics = metrics_to_floats({
            "loss": loss, "loss_dpo": losses.mean(), "implicit_acc": implicit_accuracy(logits),
            "mse_w": mse_w.mean(), "mse_l": mse_l.mean(), "ref_mse_w": ref_w.mean(), "ref_mse_l": ref_l.mean(),
            "logit_mean": logits.mean(), "sigma_neg_logit_mean": torch.sigmoid(-logits).mean(),
            # Policy MSE drifting above ref MSE on both sides = the model degrades (official code's comment).
            "model_mse": model_mse.mean(), "ref_mse": ref_mse.mean(),
        })
        return loss, metrics
