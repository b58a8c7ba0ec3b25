"""What an objective may use beyond its batch: handed once to `Objective.setup(ctx)` by the loop.

An objective that generates (SePPO's reference samples, LongAlign's reward rollout) or scores images uses these,
never the loop's internals, so the loop stays method-blind and every method encodes text, samples and decodes
the same way (the run's text encoding, the same DDIM chain as `t2i_align.rollout`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from t2i_align.conditioning.text import PromptEmbeds, encode_prompts


@dataclass
class ObjectiveContext:
    components: Any
    """The loaded model parts (t2i_align.models.Components): VAE, text encoders, training scheduler, family."""
    accelerator: Any
    cfg: Any
    """The whole run config (t2i_align.config.Config); an objective reads its own section."""
    unet: torch.nn.Module
    """The policy UNet, unwrapped (for reference providers; objectives call the policy denoiser instead)."""
    lora: bool = False
    """Whether only adapters train (LoRA and/or PPD's user branch: the base is every adapter off), else every UNet
    weight (`Config.full_finetune`). The name predates the user branch."""
    frozen: Optional[torch.nn.Module] = None
    """Full fine-tune: the one frozen copy a reference provider may use (None with LoRA)."""
    _empty: Optional[PromptEmbeds] = field(default=None, repr=False)
    _rewards: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def encode_prompts(self, prompts: List[str]) -> PromptEmbeds:
        """Prompt embeddings with the run's text encoding, on the accelerator."""
        return encode_prompts(self.components, list(prompts)).to(self.device)

    def empty_embeds(self, n: int) -> PromptEmbeds:
        """The unconditional branch of classifier-free guidance, n rows, as the pipeline makes it without a
        negative prompt (the galleries' and RAFT's sampling): the empty prompt's embeddings, or zeros for SDXL
        (`force_zeros_for_empty_prompt`)."""
        from t2i_align.sampling import zeros_for_empty_prompt

        if self._empty is None:
            empty = self.encode_prompts([""])
            if zeros_for_empty_prompt(self.components):
                pooled = empty.pooled_prompt_embeds
                empty = PromptEmbeds(torch.zeros_like(empty.prompt_embeds),
                                     None if pooled is None else torch.zeros_like(pooled))
            self._empty = empty
        return self._empty.repeat(n)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled VAE latents (a posterior sample), without gradients, in fp32."""
        from t2i_align.batches import encode_images

        return encode_images(self.components, pixels).to(self.device)

    def decode_latents(self, latents: torch.Tensor, grad: bool = False, checkpoint: bool = False) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] (fp32; rewards take `x / 2 + 0.5`), with gradients through the VAE
        decoder when `grad` (recomputed in backward when `checkpoint`)."""
        from t2i_align.rollout import decode

        return decode(self.components.vae, latents, grad=grad, checkpoint=checkpoint).float()

    def sample(self, denoiser, embeds: PromptEmbeds, *, steps: int, guidance: float,
               time_ids: Optional[torch.Tensor] = None, latent_shape=None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_0 latents from `denoiser` by DDIM without gradients (the rollout with no gradient step), one per row
        of `embeds`, classifier-free guidance against the empty prompt. Initial noise from `generator` (global
        RNG when None, so a resumed run draws what an uninterrupted one would)."""
        from t2i_align.rollout import initial_latents, rollout

        n = len(embeds)
        shape = (n, *(latent_shape or self.latent_shape()))
        noise = initial_latents(shape, generator, self.components.scheduler, device=self.device)
        with torch.no_grad():
            return rollout(denoiser, embeds, self.empty_embeds(n), self.components.scheduler, noise,
                           num_steps=steps, guidance_scale=guidance, grad_steps=(), time_ids=time_ids)

    def latent_shape(self):
        """(C, h, w) of latents at `data.resolution`."""
        unet_cfg = self.unet.config
        side = self.cfg.data.resolution // self.components.vae_scale_factor
        return (unet_cfg.in_channels, side, side)

    def reward(self, name: str, **options):
        """A reward of the registry by name, built once per (name, options), on this process's device."""
        from reward_models.options import reward_on

        key = f"{name}:{sorted((k, _option_key(v)) for k, v in options.items())}"
        if key not in self._rewards:
            self._rewards[key] = reward_on(name, options, self.device)
        return self._rewards[key]


def _option_key(value):
    """An option as part of a reward's cache key: a list (fit prompts: up to millions of captions) by its digest,
    not its text, which the key would keep for the whole run."""
    if isinstance(value, (list, tuple)):
        import hashlib

        return "sha256:" + hashlib.sha256(repr(list(value)).encode("utf-8", "surrogatepass")).hexdigest()
    return repr(value)
