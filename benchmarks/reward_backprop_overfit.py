"""Sanity check for reward_backprop: does its gradient point uphill? One fixed batch of 8 toy long training
captions, the same noise and gradient steps every time (generator seed 1), AdamW on the LoRA with clip 0.3: the
reward of that batch should rise step after step. Prints step, reward (S_ω), its relevant and irrelevant parts, and
the gradient norm before clipping. The reward is the toy CLIP's decomposed score and there is no KL term, as when
README's numbers were measured (the shipped config has since moved to the toy Denscore with a KL anchor, which this
check does not set up: a kl_weight override is refused).

    python benchmarks/reward_backprop_overfit.py strided 1e-3 runs/longalign-s1-1200/merged [key=value ...]
"""
import argparse
import sys
from types import SimpleNamespace

import torch

from t2i_align.batches import BATCH_BUILDERS, make_denoiser
from t2i_align.config import load_config
from t2i_align.adapters import add_lora
from t2i_align.models import load_components
from t2i_align.objectives.context import ObjectiveContext
from t2i_align.objectives.reward_backprop import RewardBackprop
from t2i_align.prompts import read_prompts


def main(mode: str, lr: float, model: str, overrides, steps: int = 15) -> None:
    torch.manual_seed(0)
    cfg = load_config("configs/toy/longalign_reward.yaml", [
        f"model.pretrained={model}", "output_dir=runs/longalign-overfit", "reward_backprop.num_steps=20",
        f"reward_backprop.grad_mode={mode}", "reward_backprop.grad_k=5",
        "reward_backprop.reward_options.checkpoint=toy", "reward_backprop.kl_weight=0", *overrides])
    if cfg.reward_backprop.kl_weight:
        raise SystemExit("reward_backprop_overfit.py measures the reward's gradient alone: leave kl_weight at 0")
    comps = load_components(cfg.model)
    params = add_lora(comps.unet, cfg.lora)
    cpu = torch.device("cpu")
    acc = SimpleNamespace(device=cpu, is_main_process=True, process_index=0, num_processes=1,
                          wait_for_everyone=lambda: None)  # the one-process accelerator the objective reads
    objective = RewardBackprop()
    objective.setup(ObjectiveContext(comps, acc, cfg, comps.unet, lora=True))
    prompts = read_prompts("toy:train-long")[:8]
    batch = BATCH_BUILDERS["prompts"](comps, {"caption": prompts, "resolution": 32}, cpu)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0)
    policy = make_denoiser(comps.unet, comps)
    for step in range(steps):
        loss, m = objective.compute_loss(policy, None, batch, comps.scheduler, cfg.objective,
                                         torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        print(step, *(round(m[k], 4) for k in ("reward", "reward_relevant", "reward_irrelevant")),
              round(float(norm), 4), flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", help="reward_backprop.grad_mode: strided, stratified, last or all")
    p.add_argument("lr", type=float, help="the LoRA's AdamW learning rate, e.g. 1e-3")
    p.add_argument("model", help="the model folder to tune (e.g. a merged LongAlign run, or toy)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/toy/longalign_reward.yaml")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    main(args.mode, args.lr, args.model, args.overrides)
