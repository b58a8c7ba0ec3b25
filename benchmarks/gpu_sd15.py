"""Diffusion-DPO step cost and generation throughput of the real Stable Diffusion 1.5 architecture on one GPU.

Weights are RANDOM (built here from SD1.5's configs, nothing is downloaded): timings and memory match the real
model, outputs are meaningless. The random pipeline is saved as a diffusers folder (fp16) and loaded back through
the project's `load_components`, so the measured path is the training loop's:

1. DPO training step (`get_objective("dpo")`, `make_denoiser` / `BaseReference`, the project's AdamW, gradient
   clipping at 1.0) under bf16 autocast, fp32 trainable UNet, frozen parts and full-FT reference in bf16, cached
   inputs (4x64x64 latents + prompt embeddings): LoRA r8 and full fine-tuning, 1/4/8 pairs, gradient
   checkpointing off/on. s/step = mean of --steps (5) steps after 2 warm-up steps; peak = max_memory_allocated
   since the row began (weights, frozen text encoder and VAE, optimizer state and activations).
2. `sampling.generate()` as a RAFT round runs it (data/online.py: fp32 UNet under bf16 autocast, bf16 VAE and
   text encoder): DDIM 20 steps, CFG 7.5, 512 and 256 px, batch 8 and 16, VAE decode included; beside each, a
   plain `StableDiffusionPipeline.__call__` of the same pipeline at the same settings (the sampler's overhead).

    python benchmarks/gpu_sd15.py [--json out.json] [--only train|gen]   # GPU: ~2 minutes, --only gen ~40 s
    OMP_NUM_THREADS=1 python benchmarks/gpu_sd15.py --smoke --json /tmp/smoke.json   # CPU, tiny sizes

Prints one Markdown table per part and writes the results as JSON (default $OUT/gpu_sd15.json, else
./gpu_sd15.json), rewritten after every row so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5 has only the latter
PROMPT = "a photo of a red fox sitting in a snowy forest at sunrise, highly detailed"


def build_folder(root: Path, smoke: bool, dev: torch.device = torch.device("cpu")) -> Path:
    """A StableDiffusionPipeline with SD1.5's exact configs (smoke: same layout, tiny widths), saved in fp16.
    Built on `dev`: random init of its 1.1 B parameters takes 20-40 s on CPU threads, about a second on a GPU, and
    every GPU script builds it again in its own process."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_align.toy.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    width = (32, 64, 64, 64) if smoke else None
    text_dim = 64 if smoke else 768
    with torch.device(dev):
        unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
            sample_size=8 if smoke else 64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=width or (320, 640, 1280, 1280), cross_attention_dim=text_dim, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
        vae = AutoencoderKL(  # vae/config.json
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=width or (128, 256, 512, 512), sample_size=64 if smoke else 512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower (text_encoder/config.json)
            vocab_size=49408, max_position_embeddings=77, hidden_size=text_dim, intermediate_size=4 * text_dim,
            num_hidden_layers=2 if smoke else 12, num_attention_heads=2 if smoke else 12, projection_dim=text_dim,
            hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(  # scheduler/scheduler_config.json; generation swaps in DDIM like the project
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(root / "_tok"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=torch.float16)  # half the bytes to write and read; the loader upcasts the UNet to fp32
    pipe.to("cpu")  # the GPU memory back before the first measured row
    pipe.save_pretrained(str(root / "sd15"))
    return root / "sd15"


def _sync(dev: torch.device) -> None:  # CUDA runs asynchronously: time only finished work
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _fresh(dev: torch.device) -> None:
    """Free the previous row's tensors so each row's peak is its own."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(dev: torch.device):  # GiB; includes the resident weights, frozen text encoder and VAE
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev.type == "cuda" else None


def train_row(folder: Path, dev: torch.device, lora: bool, pairs: int, ckpt: bool, steps: int, warmup: int) -> dict:
    from t2i_align.batches import make_denoiser, to_pair_batch
    from t2i_align.conditioning.text import encode_prompts
    from t2i_align.config import LoraConfig, ModelConfig, ObjectiveConfig, TrainConfig
    from t2i_align.references import BaseReference
    from t2i_align.adapters import frozen_reference, trainable_parameters
    from t2i_align.models import load_components
    from t2i_align.objectives import get_objective
    from t2i_align.optim import make_optimizer

    torch.manual_seed(0)
    # bf16 frozen parts and reference: the same dtype as autocast, so no per-call fp16 -> bf16 weight casts.
    comp = load_components(ModelConfig(pretrained=str(folder), weight_dtype="bf16", gradient_checkpointing=ckpt),
                           device=dev)
    params = trainable_parameters(comp.unet, LoraConfig(enabled=lora, rank=8))
    frozen = None if lora else frozen_reference(comp.unet, torch.bfloat16)
    policy, reference = make_denoiser(comp.unet, comp), BaseReference(comp.unet, comp, lora, frozen).denoiser()
    optimizer = make_optimizer(params, TrainConfig(), 1e-5)  # AdamW over fp32 params (8 bytes of state each)
    size = comp.unet.config.sample_size
    # What the cache hands the loop: CPU fp32 latents and prompt embeddings (moved to the GPU every step).
    raw = {"latents_w": torch.randn(pairs, 4, size, size), "latents_l": torch.randn(pairs, 4, size, size),
           "prompt_embeds": encode_prompts(comp, [PROMPT] * pairs).prompt_embeds.float().cpu()}
    dpo, ocfg = get_objective("dpo"), ObjectiveConfig()

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):  # what accelerator.autocast() is for bf16
            loss, _ = dpo.compute_loss(policy, reference, to_pair_batch(comp, raw, dev), comp.scheduler, ocfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # allocator, cuDNN/cuBLAS heuristics, optimizer state
        step()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    seconds = (time.perf_counter() - start) / steps
    return {"s_per_step": round(seconds, 4), "pairs_per_s": round(pairs / seconds, 2), "peak_gib": _peak(dev),
            "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2)}


def gen_row(comp, dev: torch.device, batch: int, px: int, steps: int, caller: str) -> dict:
    """`caller` "generate": the project's sampler as a RAFT round runs it; "pipeline": a plain diffusers call of
    the same pipeline (same components, scheduler, batch, steps, guidance, autocast, per-image generators)."""
    from t2i_align.models import build_pipeline
    from t2i_align.sampling import generate, set_scheduler

    pipe = set_scheduler(build_pipeline(comp), "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [PROMPT] * batch, list(range(batch))

    def run(n_steps: int) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if caller == "pipeline":
                generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU ones, as generate()
                pipe(prompts, num_inference_steps=n_steps, guidance_scale=7.5, height=px, width=px,
                     generator=generators, output_type="pt")  # tensors, as generate() returns
                return
            # generate() halves the batch on OOM instead of raising: a too-large batch shows as slower, not OOM.
            generate(pipe, prompts, seeds, num_inference_steps=n_steps, guidance_scale=7.5, batch_size=batch,
                     height=px, width=px)

    run(min(2, steps))  # warm-up at the same shapes, decode included
    _fresh(dev)
    _sync(dev)  # the warm-up's queued kernels finish before the clock starts
    start = time.perf_counter()
    run(steps)
    _sync(dev)
    seconds = time.perf_counter() - start
    return {"s_per_batch": round(seconds, 3), "images_per_s": round(batch / seconds, 2),
            "s_per_1k_images": round(1000 * seconds / batch, 1), "peak_gib": _peak(dev)}


def guarded(fn, *args) -> dict:
    """Run one row; an OOM or any other error becomes the row's result instead of ending the benchmark."""
    try:
        return fn(*args)
    except OOM:
        return {"error": "OOM"}
    except Exception as err:  # keep the other rows: report and go on
        traceback.print_exc()
        message = " ".join(str(err).split())[:300].replace("|", "/")  # one Markdown table cell
        return {"error": f"{type(err).__name__}: {message}"}


TRAIN_COLS = [("method", "method"), ("pairs", "pairs"), ("grad ckpt", "grad_ckpt"), ("trainable (M)", "trainable_m"),
              ("s/step", "s_per_step"), ("pairs/s", "pairs_per_s"), ("peak GiB", "peak_gib")]
GEN_COLS = [("caller", "caller"), ("px", "px"), ("batch", "batch"), ("s/batch", "s_per_batch"),
            ("images/s", "images_per_s"), ("s per 1k images", "s_per_1k_images"), ("peak GiB", "peak_gib")]


def print_header(title: str, cols) -> None:
    print(f"## {title}\n\n| " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * len(cols), flush=True)


def print_row(row: dict, cols) -> None:
    cells = [row.get(key) for _, key in cols]
    if "error" in row:  # the error goes in the first result column (the first key the row does not have)
        first = next(i for i, (_, key) in enumerate(cols) if key not in row)
        cells[first:] = [row["error"]] + [""] * (len(cols) - first - 1)
    print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |", flush=True)


class Recorder:
    """Results so far, rewritten as JSON after every row (a cut-short run keeps its rows) and printed."""

    def __init__(self, path: Path, meta: dict):
        from t2i_align.files import write_json_atomic

        self.path, self.results, self._write = path, {"meta": meta, "train": [], "generate": []}, write_json_atomic

    def record(self, part: str, row: dict, cols) -> None:
        self.results[part].append(row)
        self.save()
        print_row(row, cols)

    def save(self) -> None:
        self._write(self.path, self.results)


def _device(smoke: bool) -> torch.device:
    if smoke:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    torch.cuda.init()  # reset_peak_memory_stats fails on a CUDA context not yet initialised
    return torch.device("cuda")


def _quiet_imports() -> tuple:
    import diffusers
    import transformers

    for name in ("batches", "models", "objectives", "optim", "sampling", "toy.tokenizer"):
        importlib.import_module(f"t2i_align.{name}")  # a missing package fails now, not inside every row
    for lib in (diffusers, transformers):  # no progress bars or cast warnings between the table rows
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers.__version__, transformers.__version__


def train_part(folder: Path, dev, rec: Recorder, steps: int, warmup: int, smoke: bool) -> None:
    # Checkpointing only where activations dominate (the largest batch); smoke keeps batch 1 for both.
    grid = [(1, False), (1, True)] if smoke else [(1, False), (4, False), (8, False), (8, True)]
    print_header(f"Diffusion-DPO step (bf16 autocast, cached latents, mean of {steps} steps after {warmup} "
                 "warm-up)", TRAIN_COLS)
    for lora in (True, False):
        for pairs, ckpt in grid:
            _fresh(dev)
            row = {"method": "LoRA r8" if lora else "full", "pairs": pairs, "grad_ckpt": "on" if ckpt else "off"}
            row.update(guarded(train_row, folder, dev, lora, pairs, ckpt, steps, warmup))
            rec.record("train", row, TRAIN_COLS)
    print()


def gen_part(folder: Path, dev, rec: Recorder, smoke: bool) -> None:
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components

    _fresh(dev)
    gen_steps = 1 if smoke else 20
    comp = load_components(ModelConfig(pretrained=str(folder), weight_dtype="bf16"), device=dev)
    comp.unet.eval()
    print_header(f"generate() vs pipeline(): DDIM {gen_steps} steps, CFG 7.5, fp32 UNet + bf16 autocast, VAE "
                 "decode included", GEN_COLS)
    for px in ((64,) if smoke else (512, 256)):
        for batch in ((1,) if smoke else (8, 16)):
            for caller in ("generate", "pipeline"):
                _fresh(dev)
                row = {"caller": caller, "px": px, "batch": batch}
                row.update(guarded(gen_row, comp, dev, batch, px, gen_steps, caller))
                rec.record("generate", row, GEN_COLS)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    out_dir = os.environ.get("OUT")
    parser.add_argument("--json", default=str(Path(out_dir) / "gpu_sd15.json") if out_dir else "gpu_sd15.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code path only")
    parser.add_argument("--only", choices=("train", "gen"), default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps, after 2 warm-up steps")
    args = parser.parse_args()
    steps, warmup = (1, 1) if args.smoke else (args.steps, 2)
    dev = _device(args.smoke)
    diffusers_version, transformers_version = _quiet_imports()
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke)"
    meta = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers_version,
            "transformers": transformers_version, "smoke": args.smoke, "steps": steps, "warmup": warmup}
    rec = Recorder(Path(args.json), meta)
    print(f"# SD1.5 architecture, random weights | {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"diffusers {diffusers_version} | transformers {transformers_version}\n", flush=True)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), args.smoke, dev)
        print(f"built and saved the random pipeline in {time.perf_counter() - begin:.0f} s\n", flush=True)
        if args.only != "gen":
            train_part(folder, dev, rec, steps, warmup, args.smoke)
        if args.only != "train":
            gen_part(folder, dev, rec, args.smoke)
    meta["total_s"] = round(time.perf_counter() - begin, 1)
    rec.save()
    print(f"total {meta['total_s']} s; JSON: {rec.path}")


if __name__ == "__main__":
    main()
