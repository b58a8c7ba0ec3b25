"""FLOPs of one DPO step of a config, counted directly with torch.utils.flop_counter (benchmarks/gpu_throughput.py's
MFU): the model loaded as the loop loads it, one compute_loss + backward on a cached-style batch."""
from __future__ import annotations

from pathlib import Path

import torch

from gpu_sd15 import PROMPT

ROOT = Path(__file__).resolve().parents[1]
NO_CKPT = ["model.gradient_checkpointing=false"]


def unet_forward_flops(unet, dev, px: int) -> int:
    """FLOPs of one UNet forward on one latent (the unit for `step_over_fwd`), bf16 autocast as in training."""
    from torch.utils.flop_counter import FlopCounterMode

    size, dim = px // 8, unet.config.cross_attention_dim
    x, h, t = torch.randn(1, 4, size, size, device=dev), torch.randn(1, 77, dim, device=dev), torch.tensor([500])
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, device=dev), "time_ids": torch.zeros(1, 6, device=dev)}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"), counter:
        unet(x, t.to(dev), h, added_cond_kwargs=added)
    return counter.get_total_flops()


def cached_pair_batch(comp, pairs: int, px: int) -> dict:
    """What the latent cache hands the loop for `pairs` pairs: CPU fp32 latents, prompt embeddings (SDXL: pooled
    too) and the images' sizes for SDXL's time ids. Random values: only the shapes matter for FLOPs."""
    from t2i_align.conditioning.text import encode_prompts

    size = px // comp.vae_scale_factor
    embeds = encode_prompts(comp, [PROMPT] * pairs)
    raw = {"latents_w": torch.randn(pairs, 4, size, size), "latents_l": torch.randn(pairs, 4, size, size),
           "prompt_embeds": embeds.prompt_embeds.float().cpu()}
    if embeds.pooled_prompt_embeds is not None:
        raw["pooled_prompt_embeds"] = embeds.pooled_prompt_embeds.float().cpu()
    for side in ("w", "l"):
        raw[f"original_size_{side}"] = torch.tensor([[px, px]] * pairs)
        raw[f"crop_top_left_{side}"] = torch.zeros(pairs, 2, dtype=torch.long)
    return raw


def step_flops(yaml: str, args: list, dev, px: int, pairs: int = 1) -> dict:
    """FLOPs per pair of one DPO step of this config, counted directly: the model loaded as the loop loads it
    (LoRA, or every weight plus the frozen reference copy), one compute_loss + backward at micro-batch `pairs`
    under FlopCounterMode (as benchmarks/gpu_sd15.py's train_row steps), bf16 autocast on a GPU. Gradient
    checkpointing off: model FLOPs, not its recomputed forward. The optimizer's elementwise update is not counted
    (the counter counts matmuls, convolutions and attention only)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, fwd, _ = prepared_step(yaml, args, dev, px, pairs)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    per_pair = counter.get_total_flops() / pairs
    return {"step_flops_per_pair": per_pair, "fwd_flops_per_latent": fwd, "step_over_fwd": round(per_pair / fwd, 2)}


def prepared_step(yaml: str, args: list, dev, px: int, pairs: int = 1):
    """(step, FLOPs of one plain UNet forward on one latent, trainable parameters) of a config's DPO step: the
    model loaded as the loop loads it, `step()` one compute_loss + backward at micro-batch `pairs` on a
    cached-style batch, bf16 autocast on a GPU."""
    from t2i_align.adapters import frozen_reference, trainable_parameters
    from t2i_align.batches import make_denoiser, to_pair_batch
    from t2i_align.config import load_config
    from t2i_align.models import load_components, torch_dtype
    from t2i_align.objectives import get_objective
    from t2i_align.references import BaseReference

    cfg = load_config(ROOT / "configs" / yaml, [*args, *NO_CKPT])
    comp = load_components(cfg.model, device=dev)
    comp.time_ids = cfg.data.time_ids
    fwd = unet_forward_flops(comp.unet, dev, px)  # the plain UNet, before LoRA joins it
    params = trainable_parameters(comp.unet, cfg.lora)  # LoRA added, or every weight set to train
    frozen = frozen_reference(comp.unet, torch_dtype(cfg.model.weight_dtype)) if cfg.full_finetune else None
    policy = make_denoiser(comp.unet, comp)
    reference = BaseReference(comp.unet, comp, not cfg.full_finetune, frozen).denoiser()
    objective = get_objective(cfg.objective.name).configure(cfg)
    batch = to_pair_batch(comp, cached_pair_batch(comp, pairs, px), dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = objective.compute_loss(policy, reference, batch, comp.scheduler, cfg.objective, None)
        loss.backward()
    return step, fwd, params
