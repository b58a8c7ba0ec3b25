"""Images per second of `t2i-score`'s batched path vs a one-image-at-a-time loop over the same reward model.

Both sides read the same PNG files from a folder (as `t2i-score --images FOLDER` does) and include decoding:
"batched" is `reward_models.cli.score_items` with `--batch-size` (the function the CLI runs), "one at a time"
decodes and scores each image with its own `reward([image], [prompt])` call. Models: the shipped toy CLIP (32 px
input) and an open_clip ViT-B-32 with random weights (same compute as the real one; the scores are meaningless).
Each measurement runs a short warm-up first; the best of `--repeats` runs is kept.

    python benchmarks/reward_throughput.py [--images 256] [--batch-size 32] [--threads N] [--device cpu]

Prints a Markdown table (paste it into README) with the machine it ran on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, List

import torch
from PIL import Image

from reward_models import get_reward
from reward_models.cli import Item, folder_items, score_items
from t2i_align.toy.scenes import all_scenes, render, short_caption


def write_folder(folder: Path, n: int, size: int) -> List[Item]:
    """n toy renders at `size` px as PNGs plus metadata.jsonl; returns the CLI's items for that folder."""
    folder.mkdir(parents=True)
    scenes = all_scenes()
    lines = []
    for i in range(n):
        scene = scenes[(i * 7) % len(scenes)]
        Image.fromarray(render(scene, size=size)).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"{i:05d}.png", "prompt": short_caption(scene)}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder_items(folder, None)


def random_vit_b_32(path: Path) -> Path:
    """A ViT-B-32 open_clip state_dict with seeded random weights, saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def best_rate(run: Callable[[], None], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / min(times)


def measure(reward, items: List[Item], batch_size: int, repeats: int) -> tuple:
    def batched():
        rows, _ = score_items({"r": reward}, items, batch_size)
        assert all(r["r"] is not None for r in rows)

    def one_at_a_time():
        for item in items:
            reward([item.decode()], [item.prompt])[0].tolist()  # .tolist() waits for the device, as the CLI does

    score_items({"r": reward}, items[:batch_size], batch_size)  # warm-up: allocator, kernels, tokenizer caches
    for item in items[:4]:
        reward([item.decode()], [item.prompt])
    return best_rate(batched, len(items), repeats), best_rate(one_at_a_time, len(items), repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--models", default="toy-clip,vit-b-32")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]  # before this benchmark adds its own
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if model == "toy-clip":
                reward, size = get_reward("toy-clip", device=args.device), 32
            else:
                ckpt = random_vit_b_32(Path(tmp) / "vit_b_32.safetensors")
                reward, size = get_reward("clip", arch="ViT-B-32", checkpoint=ckpt, device=args.device), 224
            items = write_folder(Path(tmp) / model, args.images, size)
            fast, slow = measure(reward, items, args.batch_size, args.repeats)
            rows.append(f"| {model} ({size} px PNG) | {len(items)} | {args.batch_size} | {fast:.1f} | {slow:.1f} | "
                        f"{fast / slow:.1f}x |")
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"Machine: {cpu_name()} ({os.cpu_count()} CPUs, 1-min load average {load:.1f} at start){gpu}; torch "
          f"{torch.__version__} with {torch.get_num_threads()} intra-op thread(s); device {args.device}\n")
    print("| reward | images | batch | batched img/s | one-at-a-time img/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
