"""Cost of one SePPO step against one Diffusion-DPO step on the toy model (LoRA r8, as configs/toy/*.yaml).

A SePPO step first samples one image per preferred image with the drawn reference (DDIM, CFG: 2 UNet rows per
image per sampling step), decodes and re-encodes it, then runs the same [w; x] policy + reference forward and the
backward as DPO. The table splits the step into that generation and the rest, for a few sampling-step counts.

    python benchmarks/seppo_step.py [--steps 5] [--batch 16] [--sample-steps 10 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def setup(batch: int, sample_steps: int):
    from accelerate import Accelerator

    from t2i_align.batches import make_denoiser
    from t2i_align.config import load_config
    from t2i_align.adapters import trainable_parameters
    from t2i_align.models import load_components
    from t2i_align.objectives import ImageBatch, PairBatch, get_objective
    from t2i_align.objectives.context import ObjectiveContext
    from t2i_align.conditioning.text import encode_prompts

    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/toy/seppo.yaml",  # from any folder
                      [f"seppo.sample_steps={sample_steps}", "output_dir=/tmp/seppo-bench"])
    comp = load_components(cfg.model)
    params = trainable_parameters(comp.unet, cfg.lora)
    comp.unet.train()
    acc = Accelerator(cpu=True)
    ctx = ObjectiveContext(comp, acc, cfg, comp.unet, True, None)
    objs = {name: get_objective(name) for name in ("dpo", "seppo")}
    refs = {}
    for name, obj in objs.items():
        obj.setup(ctx)
        refs[name] = obj.reference_provider(ctx)
    side = cfg.data.resolution // comp.vae_scale_factor
    lat = torch.randn(batch, 4, side, side)
    embeds = encode_prompts(comp, ["a large red circle at the top left on a white background"] * batch)
    batches = {"dpo": PairBatch(lat, torch.randn_like(lat), embeds), "seppo": ImageBatch(lat, embeds)}
    opt = torch.optim.AdamW(params, lr=1e-5)
    return cfg, comp, make_denoiser(comp.unet, comp), objs, refs, batches, opt


def time_step(cfg, comp, policy, obj, provider, batch, opt, steps: int) -> float:
    def step(i):
        provider.begin_step(i)
        loss, _ = obj.compute_loss(policy, provider.denoiser(), batch, comp.scheduler, cfg.objective, None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        provider.after_step(i + 1)

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return (time.perf_counter() - start) / steps


def time_generation(obj, provider, batch, steps: int) -> float:
    provider.begin_step(0)
    start = time.perf_counter()
    for _ in range(steps):
        obj.reference_samples(provider.denoiser(), batch)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[10, 20])
    args = parser.parse_args()
    if args.steps < 1:  # a step count of 0 ended in a traceback, a negative one in negative timings
        parser.error(f"--steps {args.steps}: give a number >= 1")
    print(f"toy model, LoRA r8, batch {args.batch}, mean of {args.steps} steps, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads\n")
    print("| objective | reference sampling steps | s/step | of which generation (s) | × DPO step |\n"
          "|---|---|---|---|---|")
    dpo_s = None
    for n in args.sample_steps:
        cfg, comp, policy, objs, refs, batches, opt = setup(args.batch, n)
        if dpo_s is None:
            dpo_s = time_step(cfg, comp, policy, objs["dpo"], refs["dpo"], batches["dpo"], opt, args.steps)
            print(f"| DPO | – | {dpo_s:.3f} | – | 1.0 |", flush=True)
        s = time_step(cfg, comp, policy, objs["seppo"], refs["seppo"], batches["seppo"], opt, args.steps)
        gen = time_generation(objs["seppo"], refs["seppo"], batches["seppo"], args.steps)
        print(f"| SePPO | {n} | {s:.3f} | {gen:.3f} | {s / dpo_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
