"""Host time of one LoRA DPO step, and the share of it the base reference's switching took (issue 14: on an H200
the loop's SD1.5 LoRA step took the same ~0.25 s from 1 to 8 pairs, so the host set its pace).

    OMP_NUM_THREADS=1 python benchmarks/step_host.py [--json OUT]

CPU only, one thread: SD1.5's exact block layout at the smoke widths (benchmarks/step_ops.py: the operations a
step dispatches do not depend on the widths), fp32, configs/sd15/dpo_lora.yaml at micro-batch 1 and 64 px, so the
arithmetic is small and the time is mostly the host's. Timed: one compute_loss + backward (median of --steps), and
each way of turning the UNet into its base model and back for the reference call:
  - `eval_train`: Module.eval() then .train() (what the reference did until session 39, against dropout);
  - `diffusers_adapters`: diffusers' unet.disable_adapters() then .enable_adapters();
  - `has_user_branch`: the walk over the attention processors that looked for PPD's user branch;
  - `base_switch`: adapters.BaseSwitch.off(), which found the layers once and touches only those.
The same again with PPD's user branch added (4 tokens of width 8), where switching the branch off
(`user_branch_off`: conditioning.users.user_branch_disabled without its layers given) walked the UNet too.
Each switch time is the median of 50 on/off rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15 import build_folder  # noqa: E402
from step_flops import ROOT, prepared_step  # noqa: E402

CONFIG = "sd15/dpo_lora.yaml"


def median_ms(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return round(statistics.median(times) * 1e3, 2)


def lora_unet(args: list):
    """The config's UNet with its LoRA added, in train mode as the loop holds it."""
    from t2i_align.adapters import trainable_parameters
    from t2i_align.config import load_config
    from t2i_align.models import load_components

    cfg = load_config(ROOT / "configs" / CONFIG, args)
    unet = load_components(cfg.model, device=torch.device("cpu")).unet
    trainable_parameters(unet, cfg.lora)
    return unet.train()


def entered(context) -> None:
    with context:
        pass


def switch_costs(unet) -> dict:
    """Each way's time on `unet`; `before_ms`: what the reference call spent switching before BaseSwitch."""
    from t2i_align.adapters import BaseSwitch
    from t2i_align.conditioning.users import has_user_branch, user_branch_disabled

    switch = BaseSwitch(unet)
    row = {"eval_train_ms": median_ms(lambda: (unet.eval(), unet.train()), 50),
           "diffusers_adapters_ms": median_ms(lambda: (unet.disable_adapters(), unet.enable_adapters()), 50),
           "has_user_branch_ms": median_ms(lambda: has_user_branch(unet), 50),
           "base_switch_ms": median_ms(lambda: entered(switch.off()), 50),
           "modules": sum(1 for _ in unet.modules()), "lora_layers": len(switch.lora)}
    if switch.user is not None:
        row["user_branch_off_ms"] = median_ms(lambda: entered(user_branch_disabled(unet)), 50)
    parts = ("eval_train_ms", "diffusers_adapters_ms", "has_user_branch_ms", "user_branch_off_ms")
    row["before_ms"] = round(sum(row.get(key, 0.0) for key in parts), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    from t2i_align.conditioning.users import add_user_branch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), smoke=True)
        overrides = [f"model.pretrained={folder}", "model.weight_dtype=fp32", "train.mixed_precision='no'"]
        step, _, _ = prepared_step(CONFIG, overrides, torch.device("cpu"), 64, 1)
        step_ms = median_ms(step, args.steps)
        unet = lora_unet(overrides)
        rows = {"lora": switch_costs(unet)}
        add_user_branch(unet, 8, 4)
        rows["lora+user_branch"] = switch_costs(unet)
    print(f"{CONFIG} x1 at 64 px, one CPU thread: {step_ms} ms a step (compute_loss + backward, with BaseSwitch)")
    for name, row in rows.items():
        print(f"{name}: the reference's switching took {row['before_ms']} ms a call before, BaseSwitch "
              f"{row['base_switch_ms']} ({row})")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "config": CONFIG, "pairs": 1,
                "px": 64, "step_ms": step_ms}
        args.json.write_text(json.dumps({"meta": meta, "switches": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
