"""Cost of PPD's user branch on one Diffusion-DPO step on the toy model (Dang et al., CVPR 2025, arXiv 2501.06655).

Three set-ups, same batch of pairs, same objective (objectives/dpo.py) through the loop's own denoisers:

- LoRA r8 DPO without users (configs/toy/dpo.yaml's adapter),
- PPD: the user branch alone (IP-Adapter layout, Ye et al. 2023: to_k_ip / to_v_ip in every cross-attention
  layer plus the token projection), user tokens [B, 4, 64] as the toy encoder makes them,
- PPD + LoRA r8 (both train; the reference turns both off).

Each row is the mean of `--steps` optimizer steps after one warm-up, in one process, one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/ppd_step.py [--steps 10] [--batch 16] [--out benchmarks/results/x.json]
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


def setup(mode: str, batch: int):
    from t2i_align.batches import make_denoiser
    from t2i_align.conditioning.text import encode_prompts
    from t2i_align.config import load_config
    from t2i_align.models import add_lora, load_components
    from t2i_align.objectives import PairBatch, get_objective
    from t2i_align.references import BaseReference
    from t2i_align.users import UserTable
    from t2i_align.users.training import UserLookup

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/toy/dpo.yaml", ["output_dir=/tmp/ppd-bench"])
    comp = load_components(cfg.model)
    comp.unet.requires_grad_(False)
    params = add_lora(comp.unet, cfg.lora) if mode in ("lora", "ppd+lora") else []
    embeds = encode_prompts(comp, ["a large red circle at the top left"] * batch)
    if mode.startswith("ppd"):
        from t2i_align.conditioning.users import add_user_branch

        table = UserTable(list(range(batch)), torch.randn(batch, 4, 64))
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


def time_mode(mode: str, batch: int, steps: int) -> dict:
    cfg, comp, policy, reference, objective, pair, opt, params = setup(mode, batch)

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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = (f"toy model, DPO, batch {args.batch} pairs, mean of {args.steps} steps, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), 1 thread")
    print(header + "\n\n| set-up | trainable params | s/step | pairs/s |\n|---|---:|---:|---:|")
    rows = []
    for mode in ("lora", "ppd", "ppd+lora"):
        row = time_mode(mode, args.batch, args.steps)
        rows.append(row)
        print(f"| {mode} | {row['trainable_params']:,} | {row['s_per_step']:.3f} | {row['pairs_per_s']:.1f} |",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"setting": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
