"""Throughput and peak memory of one Diffusion-DPO training step (forward + backward + AdamW) on this CPU.

Models: the shipped toy pipeline (32 px, 4x16x16 latents) and a mid-size random pipeline with SD1.5's block
structure and fewer channels (512 px images, 4x64x64 latents). Each is run with LoRA and full fine-tuning, with
the cache on (latents and text embeddings precomputed) and off (both images VAE-encoded and the prompt encoded
every step). Every configuration runs in its own process so its peak RSS is its own. Prints a Markdown table.

    python benchmarks/dpo_step.py [--steps 5] [--batch 2] [--only toy]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def mid_size_pipeline(folder: Path) -> Path:
    """SD1.5's UNet layout (4 levels, 2 layers each, cross-attention in the first three) at reduced width."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_align.toy.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(folder / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=16, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                                cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "mid"))
    return folder / "mid"


def run_one(model: str, lora: bool, cache: bool, steps: int, batch: int) -> dict:
    from t2i_align.batches import encode_images, make_denoiser, to_pair_batch
    from t2i_align.config import LoraConfig, ModelConfig, ObjectiveConfig
    from t2i_align.conditioning.text import encode_prompts
    from t2i_align.references import BaseReference
    from t2i_align.adapters import frozen_reference, trainable_parameters
    from t2i_align.models import load_components
    from t2i_align.objectives import get_objective

    torch.manual_seed(0)
    comp = load_components(ModelConfig(pretrained=model))
    params = trainable_parameters(comp.unet, LoraConfig(enabled=lora, rank=8))
    frozen = None if lora else frozen_reference(comp.unet, torch.float32)
    policy, reference = make_denoiser(comp.unet, comp), BaseReference(comp.unet, comp, lora, frozen).denoiser()
    res = comp.unet.config.sample_size * comp.vae_scale_factor
    raw = {"pixels_w": torch.rand(batch, 3, res, res) * 2 - 1, "pixels_l": torch.rand(batch, 3, res, res) * 2 - 1,
           "caption": ["a small red circle at the top left on a white background"] * batch}
    if cache:  # what the cache hands the loop: latents and embeddings, no VAE or text encoder at train time
        embeds = encode_prompts(comp, raw["caption"])
        raw = {"latents_w": encode_images(comp, raw["pixels_w"]), "latents_l": encode_images(comp, raw["pixels_l"]),
               "prompt_embeds": embeds.prompt_embeds}
    opt = torch.optim.AdamW(params, lr=1e-5)
    dpo = get_objective("dpo")

    def step():
        loss, _ = dpo.compute_loss(policy, reference, to_pair_batch(comp, raw, "cpu"), comp.scheduler,
                                   ObjectiveConfig(), None)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"pairs_per_s": batch / seconds, "s_per_step": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", choices=("toy", "mid"), default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:  # a step count of 0 ended in a traceback, a negative one in negative timings
        parser.error(f"--steps {args.steps}: give a number >= 1")
    if args.child:
        model, lora, cache = json.loads(args.child)
        print(json.dumps(run_one(model, lora, cache, args.steps, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = {"toy": "toy"}
        if args.only != "toy":
            models["mid (SD1.5 layout, 64x64 latents)"] = str(mid_size_pipeline(Path(tmp)))
        if args.only == "mid":
            models.pop("toy")
        print(f"DPO step, batch {args.batch} pairs, mean of {args.steps} steps, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
              f"{torch.get_num_threads()} threads\n")
        print("| model | LoRA / full | cache | pairs/s | s/step | peak RSS (MiB) |\n|---|---|---|---|---|---|")
        for name, path in models.items():
            for lora in (True, False):
                for cache in (True, False):
                    child = json.dumps([path, lora, cache])
                    out = subprocess.run([sys.executable, __file__, "--child", child, "--steps", str(args.steps),
                                          "--batch", str(args.batch)], capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"| {name} | {'LoRA r8' if lora else 'full'} | {'on' if cache else 'off'} | "
                          f"{r['pairs_per_s']:.2f} | {r['s_per_step']:.3f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
