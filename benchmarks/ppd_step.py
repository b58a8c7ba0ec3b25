"""Cost of PPD's user branch on one Diffusion-DPO step (Dang et al., CVPR 2025, arXiv 2501.06655).

Three set-ups, same batch of pairs, same objective (objectives/dpo.py) through the loop's own denoisers:

- LoRA r8 DPO without users,
- PPD: the user branch alone (IP-Adapter layout, Ye et al. 2023: to_k_ip / to_v_ip in every cross-attention
  layer plus the token projection),
- PPD + LoRA r8 (both train; the reference turns both off).

Models: `toy` (configs/toy/dpo.yaml's adapter; user tokens [B, 4, 64] as the toy encoder makes them) and `mid`
(benchmarks/dpo_step.py's random pipeline in SD1.5's UNet layout at reduced width, 4x64x64 latents, LoRA on the
attention projections; user tokens [B, 29, 3584], the shape of PPD's LLaVA-OneVision Qwen2-7B embeddings).
Latents and text embeddings are precomputed (the cache). Each row is the mean of `--steps` optimizer steps after
one warm-up, in one process, one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/ppd_step.py [--model toy|mid] [--steps 10] [--batch 16] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


USER_SHAPE = {"toy": (4, 64), "mid": (29, 3584)}
"""User tokens per model: the toy encoder's [4 shots, 64]; PPD's LLaVA-OneVision Qwen2-7B [29 layers, 3584]."""


def load_config_for(model: str):
    from t2i_align.config import load_config

    overrides = ["output_dir=/tmp/ppd-bench"]
    if model == "mid":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from dpo_step import mid_size_pipeline

        folder = Path("/tmp/ppd-bench-mid")
        path = folder / "mid" if (folder / "mid" / "model_index.json").is_file() else mid_size_pipeline(folder)
        overrides += [f"model.pretrained={path}", "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
                      "data.resolution=512"]
    return load_config(ROOT / "configs/toy/dpo.yaml", overrides)


def setup(mode: str, batch: int, model: str = "toy"):
    from t2i_align.batches import make_denoiser
    from t2i_align.conditioning.text import encode_prompts
    from t2i_align.adapters import add_lora
    from t2i_align.models import load_components
    from t2i_align.objectives import PairBatch, get_objective
    from t2i_align.references import BaseReference
    from t2i_align.users import UserTable
    from t2i_align.users.training import UserLookup

    torch.manual_seed(0)
    cfg = load_config_for(model)
    comp = load_components(cfg.model)
    comp.unet.requires_grad_(False)
    params = add_lora(comp.unet, cfg.lora) if mode in ("lora", "ppd+lora") else []
    embeds = encode_prompts(comp, ["a large red circle at the top left"] * batch)
    if mode.startswith("ppd"):
        from t2i_align.conditioning.users import add_user_branch

        table = UserTable(list(range(batch)), torch.randn(batch, *USER_SHAPE[model]))
        params += add_user_branch(comp.unet, table.dim, table.num_tokens)
        comp.users = UserLookup(table, dropout=0.1)
        embeds.user_tokens = comp.users.batch_tokens({"user_id": list(range(batch))})
    comp.unet.train()
    side = cfg.data.resolution // comp.vae_scale_factor
    lat = torch.randn(batch, 4, side, side)
    pair = PairBatch(lat, torch.randn_like(lat), embeds)
    reference = BaseReference(comp.unet, comp, True, None).denoiser()
    opt = torch.optim.AdamW(params, lr=1e-4)
    return cfg, comp, make_denoiser(comp.unet, comp), reference, get_objective("dpo"), pair, opt, params


def time_mode(mode: str, batch: int, steps: int, model: str = "toy") -> dict:
    cfg, comp, policy, reference, objective, pair, opt, params = setup(mode, batch, model)

    def step():
        loss, _ = objective.compute_loss(policy, reference, pair, comp.scheduler, cfg.objective, None)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"mode": mode, "s_per_step": seconds, "pairs_per_s": batch / seconds,
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("toy", "mid"), default="toy")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.steps < 1:  # a step count of 0 ended in a traceback, a negative one in negative timings
        parser.error(f"--steps {args.steps}: give a number >= 1")
    torch.set_num_threads(1)
    header = (f"{args.model} model, DPO, batch {args.batch} pairs, mean of {args.steps} steps, "
              f"torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), 1 thread")
    print(header + "\n\n| set-up | trainable params | s/step | pairs/s |\n|---|---:|---:|---:|")
    rows = []
    for mode in ("lora", "ppd", "ppd+lora"):
        row = time_mode(mode, args.batch, args.steps, args.model)
        rows.append(row)
        print(f"| {mode} | {row['trainable_params']:,} | {row['s_per_step']:.3f} | {row['pairs_per_s']:.3g} |",
              flush=True)
    if args.out:
        from t2i_align.files import write_text_atomic  # a result file whole or not at all
        write_text_atomic(Path(args.out), json.dumps({"setting": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
