"""End-to-end check of the real training loop (`t2i_align.loop.train`) on one GPU with the SD1.5 architecture.

Weights are RANDOM (the SD1.5-shaped pipeline of benchmarks/gpu_sd15.py, nothing downloaded), so losses and images
are meaningless; what is checked is that every path of the loop runs on a real-sized model and what it costs. Five
short runs, configs from load_config(yaml or None, [key=value ...]), each in its own folder, each guarded so one
failure keeps the others:

1. LoRA DPO from a Pick-a-Pic-format parquet (configs/sd15/dpo_lora.yaml): fp16 mixed precision and fp16 frozen
   weights, batch 2 x accumulation 2, 10 steps, a checkpoint every 5, no cache.
2. The same in bf16 with data.cache=true (the latent cache is built on the fly).
3. Full fine-tuning DPO (configs/sd15/dpo_full.yaml), bf16, batch 1, 5 steps, gradient checkpointing, LR 1e-5
   without scale_lr and warm-up (the recipe's 1e-8 x scaling, warmed up over 500 steps, would leave the export
   all but equal to the base, and the check below could not tell a trained export from an untrained one).
4. RAFT (sft on best-of-K samples; defaults + overrides, so no reward weights are needed), LoRA, bf16, K=4 x 4
   prompts per round, 3 steps per round, 6 steps, 10 DDIM steps at 512 px, reward "e2e-brightness" (mean pixel
   value, registered here).
5. Online DPO: run 4 with objective.name=dpo (best vs worst of K).

Every run logs each step (log_every=1) and ends with the validation gallery (1 prompt x 1 seed x 10 steps);
tracking.wandb=off and `import wandb` is blocked, as on a machine without wandb. Per run: ok or the error, steps,
wall s (load, cache, generation, checkpoints, gallery and export included), s/step (median of the loop's
logged sec_per_step after step 1; the median skips checkpoint and RAFT-generation steps), peak
max_memory_allocated since the loop reset it at its first step (so the steps, galleries, checkpoints and the
export: not the model load or cache build) and the loop's own gpu_mem_peak_gb (the same peak at the last logged
line, before the export), final loss, and whether final/ reloads in a plain StableDiffusionPipeline (LoRA:
load_lora_weights) with the trained UNet's outputs (max |loaded - trained| / max |trained| under 1e-3, one fp32
forward with TF32 off, so that cuDNN's and cuBLAS's TF32 kernels cannot make a faithful export look wrong) and
differs from the base model's (max |loaded - base| > 0: training moved the weights).

    python benchmarks/gpu_loop_e2e.py [--json out.json]          # one CUDA GPU: 99 s on an H200 (session 38)
    OMP_NUM_THREADS=1 python benchmarks/gpu_loop_e2e.py --smoke  # CPU: tiny pipeline, 64 px, 2 steps, fp32 only

--smoke maps fp16/bf16 to fp32 (accelerate does not autocast fp16 on CPU). A Markdown table is printed; JSON goes
to --json (default $OUT/gpu_loop_e2e.json, else ./gpu_loop_e2e.json), rewritten after every run (atomically, and
strict JSON: a NaN loss is written as null).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
sys.modules["wandb"] = None  # `import wandb` raises ImportError here, as on a machine without it

from gpu_sd15 import build_folder  # noqa: E402  (this folder is sys.path[0] when run as a script)
from reward_models.base import Reward, register, to_image_tensors  # noqa: E402
from t2i_align.files import write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red fox sitting in a snowy forest at sunrise"
CAPTIONS = ["a red cube on a wooden table", "a blue bird on a branch", "a lighthouse at night",
            "a bowl of green apples", "a city street in the rain", "a yellow taxi in front of a museum"]


@register("e2e-brightness")
class Brightness(Reward):
    """Mean pixel value in [0, 1]: a reward that needs no weights, for the online runs."""

    def score(self, images, prompts):
        x = to_image_tensors(images)
        scores = x.mean(dim=(1, 2, 3)) if isinstance(x, torch.Tensor) else torch.stack([i.mean() for i in x])
        return scores.float(), {}


def write_pairs(path: Path, n: int, px: int) -> Path:
    """n Pick-a-Pic-format pairs of smooth random px x px JPEGs (upsampled 8x8 noise), alternating labels."""
    from t2i_align.toy.pairs import jpeg_bytes, write_parquet

    rng = np.random.default_rng(0)

    def image() -> bytes:
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        return jpeg_bytes(np.asarray(small.resize((px, px), Image.BICUBIC)))

    write_parquet([{"caption": CAPTIONS[i % len(CAPTIONS)], "jpg_0": image(), "jpg_1": image(),
                    "label_0": float(i % 2), "label_1": float(1 - i % 2), "user_id": 0, "are_different": True,
                    "has_label": True, "model_0": "random", "model_1": "random", "ranking_id": i}
                   for i in range(n)], path)
    return path


def step_seconds(records):
    """Median and mean of the loop's own sec_per_step after step 1 (whose warm-up is left out); the median skips
    checkpoint and RAFT-generation steps."""
    times = [r["sec_per_step"] for r in records[1:]]
    return (round(statistics.median(times), 3), round(statistics.mean(times), 3)) if times else (None, None)


@contextlib.contextmanager
def exact_fp32():
    """fp32 convolutions and matmuls without TF32 (cuDNN allows TF32 by default): the export check compares two
    models' outputs, and TF32 kernels chosen differently for each could differ by more than the tolerance."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def unet_output(unet, dev: torch.device) -> torch.Tensor:
    """One fp32 forward of `unet` on fixed random inputs (the same for every UNet of the run)."""
    gen = torch.Generator().manual_seed(0)
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    x, h = torch.randn(1, 4, size, size, generator=gen).to(dev), torch.randn(1, 77, dim, generator=gen).to(dev)
    with torch.no_grad(), exact_fp32():
        return unet.to(dev).eval()(x, torch.tensor([500], device=dev), h).sample.float()


def check_export(final: Path, folder: Path, unet, lora: bool, dev: torch.device) -> str:
    """Reload final/ in a plain StableDiffusionPipeline; its UNet must give the trained UNet's output (relative
    error under 1e-3) and not the base model's (training moved the weights)."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers import StableDiffusionPipeline

    from t2i_align.models import dtype_kwargs

    fp32 = dtype_kwargs(torch.float32)  # `dtype`, where diffusers has deprecated `torch_dtype`
    expected = "pytorch_lora_weights.safetensors" if lora else "unet"
    if not (final / expected).exists():
        return f"no: no {expected} in final/"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **fp32, safety_checker=None)
    base = unet_output(pipe.unet, dev)  # the base pipeline: before its LoRA goes in, or beside the full export
    if lora:
        pipe.load_lora_weights(str(final))
        if not getattr(pipe.unet, "peft_config", None):
            return "no: no UNet layer took the LoRA weights"
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(final), **fp32, safety_checker=None)
    loaded = unet_output(pipe.unet, dev)
    trained = unet_output(extract_model_from_parallel(unet, keep_fp32_wrapper=False), dev)  # without autocast
    rel = ((loaded - trained).abs().max() / trained.abs().max()).item()
    moved = (loaded - base).abs().max().item()
    ok = np.isfinite(rel) and rel < 1e-3 and moved > 0
    return f"{'yes' if ok else 'NO'} (vs trained: max rel diff {rel:.1e}; vs base: max abs diff {moved:.1e})"


def peak(dev: torch.device):  # GiB since the run began: weights, frozen parts, optimizer state, activations
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def _gib(value):
    return None if value is None else round(value, 2)


def run_one(name: str, yaml, overrides, out: Path, folder: Path, dev: torch.device) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from t2i_align.config import load_config
    from t2i_align.loop import train

    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed_precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"run": name, "ok": False}
    begin = time.perf_counter()
    try:
        cfg = load_config(yaml and ROOT / "configs/sd15" / yaml, [f"output_dir={out}", *overrides])
        result = train(cfg)
        row["wall_s"], row["peak_gib"] = round(time.perf_counter() - begin, 1), peak(dev)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        row["s_per_step"], row["s_per_step_mean"] = step_seconds(records)
        row.update(ok=True, steps=records[-1]["step"], final_loss=records[-1].get("loss"),
                   steps_peak_gib=_gib(records[-1].get("gpu_mem_peak_gb")),
                   checkpoints=sorted(p.name for p in (out / "checkpoints").glob("step-*")),
                   gallery=(out / "gallery" / "index.html").is_file(),
                   final=sorted(p.name for p in result.final.iterdir()))
        if cfg.raft.enabled:
            row["raft_rounds"] = len((out / "raft_rounds.jsonl").read_text().splitlines())
        try:
            row["export"] = check_export(result.final, folder, result.unet, cfg.lora.enabled, dev)
        except Exception as err:
            traceback.print_exc()
            row["export"] = f"no: {type(err).__name__}: {' '.join(str(err).split())[:120]}"
    except Exception as err:  # keep the other runs: report and go on
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    finally:
        row.setdefault("wall_s", round(time.perf_counter() - begin, 1))
        row.setdefault("peak_gib", peak(dev))
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of the full UNet are GBs each
    return row


def plan(folder: Path, data: Path, prompts: Path, tmp: Path, smoke: bool):
    """(name, yaml, overrides) of the five runs."""
    def prec(p: str):  # CPU smoke: fp32 everywhere; 'no' quoted, YAML reads a bare no as false
        return ["train.mixed_precision='no'", "model.weight_dtype=fp32"] if smoke else \
            [f"train.mixed_precision={p}", f"model.weight_dtype={p}"]

    def steps(n: int) -> int:
        return 2 if smoke else n
    common = [f"model.pretrained={folder}", "tracking.wandb=off", "train.log_every=1", "tracking.validate_every=0",
              f"tracking.validation_prompts=[{PROMPT}]", "tracking.validation_seeds=1",
              f"tracking.sample_steps={2 if smoke else 5}"]  # paths, not quality
    pairs = common + [f"data.path={data}", f"data.resolution={64 if smoke else 512}"]
    lora_dpo = pairs + ["train.batch_size=2", "train.grad_accum=2", f"train.max_steps={steps(10)}",
                        f"train.checkpoint_every={1 if smoke else 5}"]
    online = common + ["raft.enabled=true", f"raft.prompts={prompts}", "raft.k=4", "raft.prompts_per_round=4",
                       f"raft.round_steps={1 if smoke else 3}", f"train.max_steps={steps(6)}",
                       f"raft.sample_steps={2 if smoke else 5}", "raft.reward=e2e-brightness",
                       "lora.enabled=true", "train.batch_size=2", "train.checkpoint_every=0", *prec("bf16")]
    return [
        ("1 LoRA DPO fp16", "dpo_lora.yaml", lora_dpo + prec("fp16") + ["data.cache=false"]),
        ("2 LoRA DPO bf16 cached", "dpo_lora.yaml",
         lora_dpo + prec("bf16") + ["data.cache=true", f"data.cache_dir={tmp / 'cache'}"]),
        ("3 full DPO bf16 grad-ckpt", "dpo_full.yaml",
         pairs + prec("bf16") + ["train.batch_size=1", "train.grad_accum=1", f"train.max_steps={steps(5)}",
                                 "model.gradient_checkpointing=true", "data.cache=false", "train.checkpoint_every=0",
                                 # the recipe's LR (1e-8, scaled for 2048 pairs, 500 warm-up steps) barely moves
                                 # 5 steps: a plain 1e-5 lets the export check see the training
                                 "train.learning_rate=1e-5", "train.scale_lr=false", "train.lr_warmup_steps=0"]),
        ("4 RAFT (sft)", None, online + ["objective.name=sft"]),
        ("5 online DPO", None, online + ["objective.name=dpo"]),
    ]


COLS = [("run", "run"), ("ok", "ok"), ("steps", "steps"), ("wall s", "wall_s"), ("s/step", "s_per_step"),
        ("peak GiB", "peak_gib"), ("steps' peak GiB", "steps_peak_gib"), ("final loss", "final_loss"),
        ("export reloads", "export")]


def table(rows) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    for row in rows:
        cells = {**row, "ok": "yes" if row["ok"] else "no: " + row.get("error", "")[:160].replace("|", "/")}
        if isinstance(cells.get("final_loss"), float):
            cells["final_loss"] = f"{cells['final_loss']:.4f}"
        lines.append("| " + " | ".join("-" if cells.get(k) is None else str(cells[k]) for _, k in COLS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    out_dir = os.environ.get("OUT")
    parser.add_argument("--json", default=str(Path(out_dir) / "gpu_loop_e2e.json") if out_dir else "gpu_loop_e2e.json")
    parser.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU: checks the code path only")
    args = parser.parse_args()
    if args.smoke:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    else:
        torch.cuda.init()  # reset_peak_memory_stats fails on a CUDA context not yet initialised
    dev = torch.device("cpu" if args.smoke else "cuda")
    import diffusers
    import transformers

    for lib in (diffusers, transformers):  # no weight-loading bars or cast warnings between the runs
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke)", "smoke": args.smoke,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    results = {"meta": meta, "runs": []}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = build_folder(tmp, args.smoke, dev)
        px = 64 if args.smoke else 512
        data = write_pairs(tmp / "pairs.parquet", 8 if args.smoke else 32, px)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(CAPTIONS[:4]) + "\n")
        meta["setup_s"] = round(time.perf_counter() - begin, 1)
        print(f"random SD1.5-shaped pipeline and {px} px pairs ready in {meta['setup_s']} s", flush=True)
        for name, yaml, overrides in plan(folder, data, prompts, tmp, args.smoke):
            print(f"\n=== {name}", flush=True)
            row = run_one(name, yaml, overrides, tmp / f"run{len(results['runs']) + 1}", folder, dev)
            results["runs"].append(row)
            write_json_atomic(json_path, results)  # after every run: a cut-short job keeps its rows
            print(json.dumps(row), flush=True)
    meta["total_s"] = round(time.perf_counter() - begin, 1)
    write_json_atomic(json_path, results)
    print(f"\n# training loop end to end, SD1.5 architecture, random weights | {meta['device']} | "
          f"torch {meta['torch']} | diffusers {meta['diffusers']}\n\n{table(results['runs'])}\n\n"
          f"total {meta['total_s']} s; JSON: {json_path}")


if __name__ == "__main__":
    main()
