"""Images per second of `t2i-score`'s batched path vs a one-image-at-a-time loop over the same reward model.

Both sides read the same PNG files from a folder (as `t2i-score --images FOLDER` does) and include decoding:
"batched" is `reward_models.cli.score_items` with `--batch-size` (the function the CLI runs; the reward is built
with the same batch_size, as `--option NAME.batch_size=B` would), "one at a time" decodes and scores each image
with its own `reward([image], [prompt])` call. Each measurement runs a short warm-up first; the best of
`--repeats` runs is kept. Scores are meaningless (random weights); the compute is the real models'.

Models (`--models`, comma-separated):
  toy-clip     the shipped toy CLIP (32 px input)
  vit-b-32     open_clip ViT-B-32, random weights -> `get_reward("clip", arch="ViT-B-32", checkpoint=...)`
  vit-h-14     open_clip ViT-H-14 (open_clip's own config), same path with arch="ViT-H-14"
  pickscore    a transformers CLIPModel with the CLIP-ViT-H-14 config of yuvalkirstain/PickScore_v1 (= laion/CLIP-
               ViT-H-14-laion2B-s32B-b79K: vision 32 x 1280, 16 heads, patch 14, 224 px; text 24 x 1024, 16 heads;
               projection 1024; GELU), written as a model folder + a processor folder (the genuine CLIP BPE
               tokenizer, built offline by t2i_align.toy.tokenizer) -> `get_reward("pickscore", ...)`
  imagereward  `BlipRewardModel` with `BlipRewardConfig()`'s defaults (reward_models/blip_layout.py: ImageReward's
               ViT-L/16 at 224 px + BLIP med_config BERT-base with cross-attention + its MLP head), saved in the
               official blip.* / mlp.* layout with a local BERT vocab -> `get_reward("imagereward", ...)` (the text
               is padded to 35 tokens, so the small vocab does not change the compute)
Random weights are initialised on `--device` (fast on a GPU) and saved as fp16 safetensors (half the bytes): the
loaders upcast them into the fp32 model (`load_state_dict` copies into fp32 parameters; ImageReward's loader
assigns, then `.to(dtype)`); the loaders also run under `torch.device(--device)`, so their fresh models are
built there. `--dtype` is the rewards' compute dtype (t2i-score's default: fp32); `--tf32` as t2i-score's (fp32
matrix products in TF32 on CUDA). `--smoke` builds the same code paths with 2-layer, 64-wide models (a CPU check of
the script in well under a minute). A model that fails is reported as an error row and the rest still run.

    python benchmarks/reward_throughput.py [--images 256] [--batch-size 32] [--threads N] [--device cpu]
    python benchmarks/reward_throughput.py --device cuda --models vit-h-14,pickscore,imagereward --images 512 \\
        --batch-size 64 --repeats 2                                            # issue 14, one GPU
    OMP_NUM_THREADS=1 python benchmarks/reward_throughput.py --smoke --models vit-h-14,pickscore,imagereward \\
        --images 8 --batch-size 4                                              # CPU check of those code paths

GPU runtime, MEASURED in session 42 on an H200 (benchmarks/gpu_session.sh's score parts: the three models,
--images 256 --batch-size 64): 51-57 s in all, in fp32, bf16 or fp32 with TF32 alike (the environment variable
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, before --tf32 existed) (imports, builds, saves
and loads included; results/reward_throughput_*_h200.json).

Prints a Markdown table (paste it into README) with the machine it ran on, one row as each model finishes.
JSON: `--json PATH` (default $OUT/reward_throughput.json when OUT is set, else none) is rewritten after every
model, so a run cut short keeps its finished rows.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from reward_models import get_reward  # noqa: E402
from reward_models.cli import Item, folder_items, score_items, use_tf32  # noqa: E402
from t2i_align.files import write_json_atomic  # noqa: E402
from t2i_align.toy.scenes import all_scenes, render, short_caption  # noqa: E402

MODELS = ("toy-clip", "vit-b-32", "vit-h-14", "pickscore", "imagereward")
OPEN_CLIP_ARCH = {"vit-b-32": "ViT-B-32", "vit-h-14": "ViT-H-14"}
# PickScore_v1's CLIPModel config (that of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; open_clip's ViT-H-14 in HF form)
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu")
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                      eos_token_id=49407, pad_token_id=49407)
TINY_HF_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
TINY_BLIP = dict(vision_width=64, vision_layers=2, vision_heads=2, vision_mlp=128, text_width=64, text_layers=2,
                 text_heads=2, text_mlp=128)
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "of", "on", "and", "red", "blue", "green"]


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


# ---------------------------------------------------------------- random models in the layouts the loaders read
def save_fp16(state: Dict[str, torch.Tensor], path: Path) -> Path:
    """Float tensors as fp16 on the CPU -> safetensors (the loaders upcast; half the bytes of fp32)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def random_open_clip(arch: str, folder: Path, smoke: bool):
    """open_clip `arch` (open_clip's config; 2 layers x 64 wide with --smoke) with seeded random weights ->
    (the `arch` to load it with, the safetensors path)."""
    import open_clip
    from open_clip.model import CLIP

    cfg = open_clip.get_model_config(arch)
    if smoke:  # a config dict instead of the name: the loader accepts both
        cfg = {"embed_dim": 32, "vision_cfg": {**cfg["vision_cfg"], "layers": 2, "width": 64, "head_width": 32},
               "text_cfg": {**cfg["text_cfg"], "layers": 2, "width": 64, "heads": 2}}
    torch.manual_seed(0)
    path = save_fp16(CLIP(**cfg).state_dict(), folder / f"{arch}.safetensors")
    return (cfg if smoke else arch), path


def random_pickscore(folder: Path, smoke: bool) -> Tuple[Path, Path]:
    """PickScore_v1's layout: model folder (config.json + model.safetensors) and processor folder (CLIP tokenizer
    + preprocessor_config.json of the laion ViT-H-14 repo) -> (model_dir, processor_dir)."""
    from transformers import CLIPConfig, CLIPModel

    from reward_models.clip import OPENAI_MEAN, OPENAI_STD
    from t2i_align.toy.tokenizer import build_clip_tokenizer

    vision, text = (({**PICKSCORE_VISION, **TINY_HF_TOWER}, {**PICKSCORE_TEXT, **TINY_HF_TOWER}) if smoke
                    else (PICKSCORE_VISION, PICKSCORE_TEXT))
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=32 if smoke else 1024)
    model_dir, processor_dir = folder / "PickScore_v1", folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    config.save_pretrained(str(model_dir))
    torch.manual_seed(0)
    save_fp16(CLIPModel(config).state_dict(), model_dir / "model.safetensors")
    build_clip_tokenizer(processor_dir)
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "resample": 3,
         "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}))
    return model_dir, processor_dir


def random_imagereward(folder: Path, smoke: bool):
    """ImageReward's architecture (BlipRewardConfig defaults) in the official key layout, plus a local BERT vocab
    -> (checkpoint, tokenizer folder, config)."""
    from reward_models.blip_layout import BlipRewardConfig, BlipRewardModel, native_to_official

    config = BlipRewardConfig(**(TINY_BLIP if smoke else {}))
    torch.manual_seed(0)
    checkpoint = save_fp16(native_to_official(BlipRewardModel(config).state_dict()),
                           folder / "ImageReward.safetensors")
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return checkpoint, folder, config


def load_reward(model: str, folder: Path, args) -> Tuple[object, int]:
    """(reward, PNG size in px) for one `--models` entry, loaded the way t2i-score loads it."""
    opts = dict(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if model == "toy-clip":
        return get_reward("toy-clip", **opts), 32
    with torch.device(args.device):  # random init and the loaders' fresh models: on the device, not the CPU
        if model in OPEN_CLIP_ARCH:
            arch, checkpoint = random_open_clip(OPEN_CLIP_ARCH[model], folder, args.smoke)
            return get_reward("clip", arch=arch, checkpoint=checkpoint, **opts), 224
        if model == "pickscore":
            model_dir, processor_dir = random_pickscore(folder, args.smoke)
            return get_reward("pickscore", model_dir=model_dir, processor_dir=processor_dir, **opts), 224
        if model == "imagereward":
            checkpoint, tokenizer, config = random_imagereward(folder, args.smoke)
            return get_reward("imagereward", checkpoint=checkpoint, tokenizer=tokenizer, config=config,
                              **opts), config.image_size
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


# ---------------------------------------------------------------- measuring
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


def run_model(model: str, tmp: Path, folders: Dict[int, List[Item]], args, base: dict) -> dict:
    """One row: build + load, then measure; any error becomes the row's `error` (the next model still runs)."""
    row = {"model": model, **base}
    start = time.perf_counter()
    try:
        reward, size = load_reward(model, tmp / model, args)
        row["setup_s"] = round(time.perf_counter() - start, 1)
        if size not in folders:  # one PNG folder per size, shared by the models that read it
            folders[size] = write_folder(tmp / f"png{size}", args.images, size)
        start = time.perf_counter()
        fast, slow = measure(reward, folders[size], args.batch_size, args.repeats)
        row.update(image_px=size, batched_img_s=round(fast, 2), one_at_a_time_img_s=round(slow, 2),
                   speed_up=round(fast / slow, 2), measure_s=round(time.perf_counter() - start, 1))
    except Exception as e:  # noqa: BLE001 - reported in the row and on stderr
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
    reward = None  # free the model (several GB on a GPU) before the next one is built
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def table_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | error: {row['error'].splitlines()[0][:200]} |"
    return (f"| {row['model']} ({row['image_px']} px PNG) | {row['images']} | {row['batch']} | "
            f"{row['batched_img_s']:.1f} | {row['one_at_a_time_img_s']:.1f} | {row['speed_up']:.1f}x |")


def main(argv=None) -> int:
    """0 when every model was measured, 1 when a row holds an error (the rest still ran)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="the rewards' dtype: fp32 (t2i-score's default), bf16, fp16")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tf32", action="store_true", help="as t2i-score --tf32: fp32 matrix products in TF32 (CUDA)")
    p.add_argument("--models", default="toy-clip,vit-b-32", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--smoke", action="store_true", help="2-layer, 64-wide versions of the models (CPU check)")
    p.add_argument("--json", type=Path, default=None,
                   help="rows as JSON, rewritten after every model (default: $OUT/reward_throughput.json if OUT "
                        "is set, else none)")
    args = p.parse_args(argv)
    for flag in ("images", "batch_size", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(MODELS):
        p.error(f"unknown --models {sorted(set(models) - set(MODELS))}; choose from {', '.join(MODELS)}")
    json_path: Optional[Path] = args.json or (Path(os.environ["OUT"]) / "reward_throughput.json"
                                              if os.environ.get("OUT") else None)
    load = os.getloadavg()[0]  # before this benchmark adds its own
    if args.threads:
        torch.set_num_threads(args.threads)
    tf32 = args.tf32 and use_tf32(args.device)  # what t2i-score --tf32 does (a note on a CPU)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else cpu_name()
    base = {"images": args.images, "batch": args.batch_size, "repeats": args.repeats, "dtype": args.dtype,
            "tf32": tf32, "device": args.device, "device_name": device_name, "torch": torch.__version__,
            "smoke": args.smoke}
    print(f"Machine: {cpu_name()} ({os.cpu_count()} CPUs, 1-min load average {load:.1f} at start)"
          f"{', ' + device_name if cuda else ''}; torch {torch.__version__} with {torch.get_num_threads()} intra-op "
          f"thread(s); device {args.device}, {args.dtype}{' (TF32 matmuls)' if tf32 else ''}"
          f"{'; --smoke: tiny models' if args.smoke else ''}\n")
    print("| reward | images | batch | batched img/s | one-at-a-time img/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders: Dict[int, List[Item]] = {}
        for model in models:
            rows.append(run_model(model, Path(tmp), folders, args, base))
            print(table_row(rows[-1]), flush=True)
            if json_path is not None:
                write_json_atomic(json_path, rows)
    return int(any("error" in row for row in rows))


if __name__ == "__main__":
    sys.exit(main())
