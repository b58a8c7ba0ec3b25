"""SePPO: preference optimisation from preferred images only (Zhang et al. 2024, arXiv 2410.05255, v1 Sec. 4;
renamed SSPO in v2, where RCR = random checkpoint replay and SSR = the flipper below).

No training code was ever published; this is reconstructed from the paper's abstract and its public ICLR 2025
reviews, every choice the paper leaves open being a `seppo.*` setting:

- the reference θ_ref is drawn each step from past policy snapshots (`t2i_align.references.SnapshotPool`);
- θ_ref samples one image x^r per prompt of the batch (the preferred image's caption), which takes the loser's
  slot of Diffusion-DPO; a row whose caption data.prompt_dropout blanked is trained unconditional (x^w and x^r
  alike, as Diffusion-DPO's dropped rows), its x^r still sampled for the caption (`sampling_embeds`);
- the anchor-based adaptive flipper (AAF) signs the reference sample's term per sample, from the policy's and the
  reference's denoising errors on the preferred ("anchor") image x^w at the same ε and t (no gradient):

      d = ‖ε - ε_ref(x^w_t)‖² - ‖ε - ε_θ(x^w_t)‖²          s = +1 if d > 0 (policy already better: x^r a loser)
                                                            s = -1 otherwise (x^r treated as a winner)
      L = -log σ(-½β [Δ_w - s·Δ_r]),   Δ_x = ‖ε - ε_θ(x_t)‖² - ‖ε - ε_ref(x_t)‖²

  which is `dpo_loss` with the loser's errors multiplied by s. A tie counts as "not better": s = -1, both images
  pulled towards lower error (SFT-like, v2's "switch from DPO to SFT"). When the drawn snapshot IS the policy
  (step 0 with the initial model; a snapshot taken at this very step, or before steps that were all skipped for a
  non-finite gradient), d is only rounding noise (the policy runs with autograd, the reference without, and
  kernels differ in the last bits), so the whole batch is a tie, by the weights' identity rather than by a
  tolerance. `indicator` (s ∈ {1, 0}) is the paper's ablation; `off` is
  always DPO. `seppo.anchor_draws` > 1 (ours) averages d over more (ε, t) draws; the paper tests one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from t2i_align import diffusion
from t2i_align.adapters import visiting
from t2i_align.conditioning.text import PromptEmbeds, encode_prompts
from t2i_align.config import ObjectiveConfig
from t2i_align.objectives.base import Denoiser, ImageBatch, Metrics, Objective, PairBatch, metrics_to_floats
from t2i_align.objectives.dpo import dpo_loss, implicit_accuracy
from t2i_align.objectives.sft import preferred_images

FLIPS = ("sign", "indicator", "off")


def aaf_sign(policy_err_w: torch.Tensor, ref_err_w: torch.Tensor, flip: str, tie: bool = False) -> torch.Tensor:
    """Per-sample s from the anchor errors [B]: see the module docstring (ties d = 0, or `tie` for the whole
    batch, give -1 under "sign" and 0 under "indicator")."""
    better = ((ref_err_w - policy_err_w) > 0) & (not tie)
    if flip == "sign":
        return torch.where(better, 1.0, -1.0).to(policy_err_w.dtype)
    if flip == "indicator":
        return better.to(policy_err_w.dtype)
    if flip == "off":
        return torch.ones_like(policy_err_w)
    raise ValueError(f"unknown seppo.flip {flip!r}; use one of {FLIPS}")


def seppo_loss(mse_w: torch.Tensor, mse_r: torch.Tensor, ref_w: torch.Tensor, ref_r: torch.Tensor, beta: float,
               flip: str = "sign", beta_convention: str = "official", loss_type: str = "sigmoid",
               tie: bool = False, sft_weight: float = 0.0, anchor: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample losses, logits, s): Diffusion-DPO with the reference sample as loser, its term times s; plus
    `sft_weight` · mse_w (ours: `objective.sft_weight`, the RPO-style anchor on the preferred image). `anchor`:
    the (policy, reference) errors on the preferred image that decide s, if not this draw's (`anchor_draws`)."""
    policy_anchor, ref_anchor = anchor if anchor is not None else (mse_w, ref_w)
    s = aaf_sign(policy_anchor.detach(), ref_anchor.detach(), flip, tie)
    losses, logits = dpo_loss(mse_w, s * mse_r, ref_w, s * ref_r, beta, beta_convention, loss_type)
    return losses + sft_weight * mse_w, logits, s


@torch.no_grad()
def anchor_error_draws(policy: Denoiser, reference: Denoiser, scheduler: object, latents: torch.Tensor, embeds,
                       draws: int, generator: Optional[torch.Generator] = None,
                       time_ids: Optional[torch.Tensor] = None, noising: Optional[dict] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """[draws, B] policy and reference denoising errors on `latents`, each draw with its own (ε, t) shared by both
    models, without gradients (the flipper's test, repeated). `noising`: `diffusion.noised`'s keywords."""
    pol, ref = [], []
    for _ in range(draws):
        noisy, t, target = diffusion.noised(scheduler, latents, generator, **(noising or {}))
        pol.append(diffusion.per_sample_mse(policy(noisy, t, embeds, time_ids), target))
        ref.append(diffusion.per_sample_mse(reference(noisy, t, embeds, time_ids), target))
    return torch.stack(pol), torch.stack(ref)


def sampling_embeds(components, images: ImageBatch) -> PromptEmbeds:
    """The conditioning x^r is sampled with: the batch's, with the rows data.prompt_dropout blanked encoded from
    their caption again (x^r is the reference's image for the preferred image's prompt; sampled from "" it was an
    unconditional image, and on SDXL guidance between "" and zeros)."""
    embeds = images.embeds
    if not images.dropped_captions:
        return embeds
    rows, captions = (list(x) for x in zip(*images.dropped_captions))
    fresh = encode_prompts(components, captions)
    prompt = embeds.prompt_embeds.clone()
    prompt[rows] = fresh.prompt_embeds.to(prompt.device, prompt.dtype)
    pooled = embeds.pooled_prompt_embeds
    if pooled is not None:
        pooled = pooled.clone()
        pooled[rows] = fresh.pooled_prompt_embeds.to(pooled.device, pooled.dtype)
    return PromptEmbeds(prompt, pooled, embeds.user_tokens)


class SePPO(Objective):
    """Preferred images in (pair data: the winners, as SFT), reference samples generated here."""

    needs_reference = True
    batch_kind = "images"
    pool = None

    def configure(self, cfg) -> "SePPO":
        # LoRA snapshots enter the live UNet by torch.func, which FSDP's gathering overrides; a full fine-tune's
        # snapshots are loaded into the frozen copy, which is never sharded
        self.runs_sharded = cfg.full_finetune
        return self

    def reference_provider(self, ctx):
        from accelerate.utils import broadcast_object_list

        from t2i_align.engines import full_weights
        from t2i_align.references import SnapshotPool

        sc = ctx.cfg.seppo
        self.pool = SnapshotPool(ctx.unet, ctx.components, ctx.lora, ctx.frozen, snapshot_every=sc.snapshot_every,
                                 pool_size=sc.pool_size, draw=sc.reference, seed=ctx.cfg.seed,
                                 output_dir=ctx.cfg.output_dir, is_main=ctx.accelerator.is_main_process,
                                 share=lambda value: broadcast_object_list([value])[0],
                                 weights=lambda: full_weights(ctx.accelerator, ctx.unet),
                                 in_memory=sc.snapshots_in_memory,
                                 resume_from=None if ctx.cfg.train.resume in (None, "latest") else
                                 Path(ctx.cfg.train.resume))
        return self.pool

    def _resident(self, device: torch.device):
        """The offloaded frozen copy (train.offload_reference) brought over once for a block of reference calls,
        which then find it there: moved per call, a sample's every step sent the whole UNet over and back."""
        frozen = self.ctx.frozen
        return visiting(frozen, device) if frozen is not None else contextlib.nullcontext()

    @torch.no_grad()
    def reference_samples(self, reference: Denoiser, images: ImageBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One sample of the reference per row, at the preferred images' size; (latents, SDXL time ids)."""
        ctx, sc = self.ctx, self.ctx.cfg.seppo
        latents = images.latents
        time_ids = None
        if ctx.components.spec.uses_time_ids:  # generated at the training size, uncropped (as RAFT's samples)
            from t2i_align.conditioning.text import sdxl_time_ids

            size = tuple(int(d * ctx.components.vae_scale_factor) for d in latents.shape[-2:])
            time_ids = sdxl_time_ids(size, (0, 0), size, batch_size=len(latents)).to(latents.device)
        with self._resident(latents.device):
            sample = ctx.sample(reference, sampling_embeds(ctx.components, images), steps=sc.sample_steps,
                                guidance=sc.guidance_scale, time_ids=time_ids, latent_shape=tuple(latents.shape[1:]))
        if sc.reencode:
            sample = ctx.encode_images(ctx.decode_latents(sample).clamp(-1, 1))
        return sample.to(latents.device, latents.dtype), time_ids

    def anchor_errors(self, policy: Denoiser, reference: Denoiser, images: ImageBatch, scheduler: object,
                      cfg: ObjectiveConfig, generator: Optional[torch.Generator], mse_w: torch.Tensor,
                      ref_w: torch.Tensor, tie: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The flipper's (policy, reference) errors on the preferred images, averaged over `seppo.anchor_draws`
        (ε, t) draws: this step's draw plus anchor_draws − 1 more, without gradients. The policy's are those of the
        training forward, so with lora.dropout > 0 its dropout is on (the reference runs in eval mode): that raises
        the policy's error on average and tilts s towards −1 (the official code has no dropout; the default is 0).
        No extra draws where s is not read (`tie`, flip off): they were 2·(anchor_draws − 1) UNet calls for nothing."""
        extra = self.ctx.cfg.seppo.anchor_draws - 1
        if not extra or tie or self.ctx.cfg.seppo.flip == "off":
            return mse_w.detach(), ref_w.detach()
        with self._resident(images.latents.device):
            pol, ref = anchor_error_draws(policy, reference, scheduler, images.latents, images.embeds, extra,
                                          generator, images.time_ids, cfg.noising)
        return torch.cat([mse_w.detach()[None], pol]).mean(0), torch.cat([ref_w.detach()[None], ref]).mean(0)

    def compute_loss(self, policy: Denoiser, reference: Optional[Denoiser], batch: Union[ImageBatch, PairBatch],
                     scheduler: object, cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, Metrics]:
        self.check_reference(policy, reference)
        images = preferred_images(batch)
        lw = images.latents
        lr, tr = self.reference_samples(reference, images)
        latents = torch.cat([lw, lr])
        noisy, timesteps, target = diffusion.noised(scheduler, latents, generator, repeats=2, **cfg.noising)
        embeds = images.embeds.repeat(2)
        time_ids = None if images.time_ids is None else torch.cat([images.time_ids, tr])

        model_mse = diffusion.per_sample_mse(policy(noisy, timesteps, embeds, time_ids), target)
        with torch.no_grad():
            ref_mse = diffusion.per_sample_mse(reference(noisy, timesteps, embeds, time_ids).detach(), target)
        mse_w, mse_r = model_mse.chunk(2)
        ref_w, ref_r = ref_mse.chunk(2)
        tie = self.pool is not None and self.pool.reference_is_policy()
        anchor = self.anchor_errors(policy, reference, images, scheduler, cfg, generator, mse_w, ref_w, tie)
        losses, logits, s = seppo_loss(mse_w, mse_r, ref_w, ref_r, cfg.beta, self.ctx.cfg.seppo.flip,
                                       cfg.beta_convention, cfg.loss_type, tie, cfg.sft_weight, anchor)
        loss = losses.mean()
        metrics = metrics_to_floats({
            "loss": loss, "implicit_acc": implicit_accuracy(logits), "logit_mean": logits.mean(),
            # share of reference samples NOT treated as losers (s = -1 under sign, 0 under indicator)
            "flip_rate": (s < 1).float().mean(),
            "mse_w": mse_w.mean(), "mse_ref_sample": mse_r.mean(),
            "ref_mse_w": ref_w.mean(), "ref_mse_ref_sample": ref_r.mean(),
        })
        return loss, metrics
