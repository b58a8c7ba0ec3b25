"""Training throughput of the real loop on one GPU, the speed levers one at a time, peak memory and MFU (issue 14).

Weights are RANDOM (SD1.5's and SDXL's exact configs, nothing downloaded): timings, FLOPs and memory are the real
models', losses are meaningless. Every row is one `t2i_align.loop.train` run in this process (configs/sd15/
dpo_lora.yaml, dpo_full.yaml or configs/sdxl/dpo_lora.yaml plus overrides): Diffusion-DPO, bf16 autocast, frozen
parts in bf16, cached latents (data.cache=true; built by the part's first row, outside the timed steps),
gradient accumulation 1, a log line every step. The parts (--parts, in the order given) and their rows:

  sd15-lora     512 px, LoRA r8: micro-batch 1, 4, 8, 16, 32 (the >= 30 pairs/s question)
  sd15-full     512 px, full fine-tuning (bf16 reference copy), no gradient checkpointing: micro-batch 8
  sdxl-lora     1024 px, LoRA r8, gradient checkpointing on (configs/sdxl/base.yaml): micro-batch 1, 4
  sd15-lever    micro-batch 8, ONE change each. LoRA r8: the baseline, model.channels_last, the LoRA's base UNet
                in bf16 (model.cast_base_unet), model.attention=sdpa-flash / sdpa-efficient / sdpa-math, gradient
                checkpointing. Full fine-tuning (its own baseline row): train.optimizer=adamw_fused and
                frozen parts fp32 (with LoRA both measure nothing: AdamW over 1.6 M LoRA parameters is a sliver
                of the step, and with cached latents the frozen parts' dtype changes only the cache key; a full
                fine-tune steps 860 M parameters and its reference copy takes the frozen dtype). Last, LoRA with
                model.attention=sdpa-cudnn: a hard CUDA error there would poison the process's CUDA context for
                every later row.
  sd15-full-lever  the lever part's full fine-tuning rows alone (its baseline, fused AdamW, frozen fp32)
  sd15-compile  LoRA r8 x8 with train.compile (inductor): its own part, for its first steps compile for 1-3
                minutes (--warmup must cover them, or the median shows compile time). Only the policy's forward
                and backward are compiled; the reference forward (the same UNet with adapters off) runs eager.

Per row: s/step = median of the loop's own `sec_per_step` (wall time per optimizer step, measured after the
device has synchronised) over the --steps (5) steps after --warmup (2); pairs/s = micro-batch / s/step; peak =
the loop's `gpu_mem_peak_gb` on its last logged line (max_memory_allocated since the first step: weights, frozen
parts, optimizer state, activations, the galleries in between; not the model load's or the cache build's).
FLOPs: per config file, after its first row, one DPO step counted directly with torch.utils.flop_counter.
FlopCounterMode (the config's model loaded once, gradient checkpointing off, compute_loss and backward at micro-
batch 1 under bf16 autocast; model FLOPs: neither checkpointing's recomputed forward nor the optimizer), times the
micro-batch (every counted op - convolution, matmul, attention - runs once per sample). TFLOP/s = FLOPs per step
/ s/step; MFU = that / --peak-tflops (989.4: the H100/H200 SXM dense bf16 peak). Cross-check: `step_over_fwd` =
step FLOPs / the FLOPs of one UNet forward on one latent: about 2 (reference) + 2 (policy) + 2-4 (backward) for
DPO; a value near 4 would mean the backward was not counted.

    python benchmarks/gpu_throughput.py [--parts sd15-lora,sd15-full,sdxl-lora] [--budget-s 540]
    OMP_NUM_THREADS=1 python benchmarks/gpu_throughput.py --smoke     # CPU: tiny models, every code path

On an H200 (measured, sessions 38 and 42, imports and the random models' builds included): sd15-lora 75 s,
sdxl-lora + sd15-full 98 s, sd15-lever 83 s, sd15-full-lever 65 s, sd15-compile 154 s.
--budget-s stops before a row that would not finish in time (a row's estimate: the part's previous row, 30 s
for a part's first, 240 s for the compile row); skipped rows are listed. JSON (default $OUT/gpu_throughput.json,
else ./gpu_throughput.json) is rewritten after every row; one Markdown table per part is printed. --smoke maps
bf16 to fp32 and the GPU-only kernels' rows end in their error text.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
sys.modules["wandb"] = None  # `import wandb` raises ImportError here, as on a machine without it

from gpu_loop_e2e import write_pairs  # noqa: E402  (this folder is sys.path[0] when run as a script)
from step_flops import NO_CKPT, step_flops  # noqa: E402
from gpu_sd15 import (PROMPT, Recorder, _device, _fresh, _quiet_imports, build_folder,  # noqa: E402
                      guarded, print_header)

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.4
LORA, FULL, SDXL = "sd15/dpo_lora.yaml", "sd15/dpo_full.yaml", "sdxl/dpo_lora.yaml"
LORA_LEVERS = [("baseline", []), ("channels_last", ["model.channels_last=true"]),
               # the frozen base in model.weight_dtype; bf16 named again for --smoke, which is fp32 elsewhere
               ("base unet bf16", ["train.mixed_precision=bf16", "model.weight_dtype=bf16",
                                   "model.cast_base_unet=true"]),
               ("sdpa-flash", ["model.attention=sdpa-flash"]), ("sdpa-efficient", ["model.attention=sdpa-efficient"]),
               ("sdpa-math", ["model.attention=sdpa-math"]), ("grad ckpt", ["model.gradient_checkpointing=true"])]
# with its own baseline: in session 42 the full rows were read against session 38's sd15-full row
FULL_LEVERS = [("full: baseline", []), ("full: adamw_fused", ["train.optimizer=adamw_fused"]),
               ("full: frozen fp32", ["model.weight_dtype=fp32"])]
COMPILE_NOTE = "inductor compiles the policy's forward and backward only; the reference forward runs eager"
FIRST_ROW_S = 30.0  # a part's first row: load, cache build, steps, export, gallery (SDXL's is the longest)
# rows whose time the previous row does not predict: inductor compiles for minutes; SDXL's first row loads 7 GB,
# caches 1024 px latents and decodes its gallery with the fp32 VAE
ESTIMATE_S = {"compile": 240.0, "LoRA r8 ckpt x1": 60.0}
COLS = [("row", "row"), ("pairs", "pairs"), ("s/step", "s_per_step"), ("pairs/s", "pairs_per_s"),
        ("peak GiB", "peak_gib"), ("TFLOP/s", "tflops"), ("MFU", "mfu"), ("wall s", "wall_s")]


def build_sdxl_folder(root: Path, smoke: bool, dev: torch.device) -> Path:
    """A StableDiffusionXLPipeline with SDXL base 1.0's configs (smoke: same layout, tiny widths), saved in fp16.
    Built on `dev`: random init of 3.5 B parameters is minutes on CPU threads, seconds on a GPU."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2i_align.toy.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    dims = (64, 64) if smoke else (768, 1280)  # the two text encoders' widths (CLIP ViT-L, OpenCLIP bigG)

    def text(width: int, layers: int, heads: int, act: str, cls):
        return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=width,
                                  intermediate_size=4 * width, num_hidden_layers=2 if smoke else layers,
                                  num_attention_heads=2 if smoke else heads, projection_dim=width, hidden_act=act))
    with torch.device(dev):
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
            sample_size=16 if smoke else 128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64) if smoke else (320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2) if smoke else (1, 2, 10),
            attention_head_dim=(2, 4, 4) if smoke else (5, 10, 20), cross_attention_dim=sum(dims),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + dims[1], norm_num_groups=32)
        vae = AutoencoderKL(  # vae/config.json (force_upcast: the loader keeps it fp32)
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(32, 64, 64, 64) if smoke else (128, 256, 512, 512),
            sample_size=128 if smoke else 1024, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        encoder = text(dims[0], 12, 12, "quick_gelu", CLIPTextModel)
        encoder_2 = text(dims[1], 32, 20, "gelu", CLIPTextModelWithProjection)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    tokenizer = build_clip_tokenizer(root / "_tok")
    tokenizer_2 = build_clip_tokenizer(root / "_tok2")
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!"
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.to(dtype=torch.float16)  # cast where it was built, then to the CPU: half the bytes to move and write
    pipe.to("cpu")
    pipe.save_pretrained(str(root / "sdxl"))
    return root / "sdxl"


def overrides(folder: Path, data: Path, cache: Path, px: int, pairs: int, steps: int, smoke: bool) -> list:
    prec = ["train.mixed_precision='no'", "model.weight_dtype=fp32"] if smoke else \
        ["train.mixed_precision=bf16", "model.weight_dtype=bf16"]
    return [f"model.pretrained={folder}", f"data.path={data}", f"data.resolution={px}", "data.cache=true",
            f"data.cache_dir={cache}", f"train.batch_size={pairs}", "train.grad_accum=1", f"train.max_steps={steps}",
            "train.log_every=1", "train.checkpoint_every=0", "tracking.wandb=off", "tracking.validate_every=0",
            f"tracking.validation_prompts=['{PROMPT}']", "tracking.validation_seeds=1", "tracking.sample_steps=1",
            *prec]


class Cut(BaseException):
    """The part's time limit (`timeout` sends SIGTERM, then SIGKILL 15 s later): not an Exception, so that no row's
    `guarded` takes it for a row's error."""


CUT: list = []
"""Set when SIGTERM came: the row in progress keeps the steps it logged, then the script ends."""


def _on_sigterm(signum, frame) -> None:
    if CUT:  # a second SIGTERM (the process group's) must not cut the saving of the first
        return
    CUT.append(time.perf_counter())
    raise Cut()


def run_loop(yaml: str, args: list, out: Path):
    """One `train` run, after resetting accelerate's process-wide state (it refuses a second Accelerator with
    other settings); the run's folder is deleted afterwards (a full fine-tune's export is GBs). Cut by SIGTERM,
    the steps it logged are returned (and `CUT` is set)."""
    import shutil

    from accelerate.state import AcceleratorState, GradientState

    from t2i_align.config import load_config
    from t2i_align.files import keep_jsonl
    from t2i_align.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:  # no export: a full fine-tune's is a 4.3 GB fp32 write with the GPU idle (gpu_loop_e2e.py checks exports)
        with mock.patch("t2i_align.loop.export_final", lambda *a, **k: out / "final"):
            try:
                train(load_config(ROOT / "configs" / yaml, [f"output_dir={out}", *args]))
            except Cut:
                pass
        path = out / "metrics.jsonl"
        if not path.is_file():
            return []
        keep_jsonl(path, lambda record: True)  # drops a line torn by the cut
        return [json.loads(line) for line in path.read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def timed_row(yaml: str, args: list, out: Path, pairs: int, warmup: int, peak_tflops: float, flops) -> dict:
    begin = time.perf_counter()
    records = run_loop(yaml, args, out)
    if len(records) <= warmup:
        raise RuntimeError(f"{'cut by the time limit' if CUT else 'ended'} after {len(records)} logged step(s), "
                           f"none past the {warmup} warm-up steps")
    seconds = statistics.median(r["sec_per_step"] for r in records[warmup:])
    peak = records[-1].get("gpu_mem_peak_gb")  # the steps' peak (CUDA only): not the load's or the cache build's
    row = {"pairs": pairs, "s_per_step": round(seconds, 4), "pairs_per_s": round(pairs / seconds, 2),
           "peak_gib": None if peak is None else round(peak, 2), "wall_s": round(time.perf_counter() - begin, 1),
           "final_loss": records[-1].get("loss")}
    if CUT:
        row["note"] = f"cut by the time limit: {len(records) - warmup} timed step(s)"
    add_mfu(row, flops, peak_tflops)
    return row


def add_mfu(row: dict, flops, peak_tflops: float) -> None:
    """TFLOP/s achieved and MFU, when the config's FLOPs were counted."""
    if flops and "error" not in flops and "s_per_step" in row:
        tflops = flops["step_flops_per_pair"] * row["pairs"] / row["s_per_step"] / 1e12
        row.update(tflops=round(tflops, 1), mfu=f"{100 * tflops / peak_tflops:.1f}%")


class Budget:
    """Skip a row that would end past the deadline; its estimate is the part's previous row's wall time (or the
    row's own, ESTIMATE_S, where that says more)."""

    def __init__(self, seconds: float):
        self.deadline, self.last = time.perf_counter() + seconds, FIRST_ROW_S

    def allows(self, label: str = "") -> bool:
        return time.perf_counter() + max(self.last, ESTIMATE_S.get(label, 0.0)) < self.deadline


def run_part(name: str, plan, ctx: dict, rec: Recorder, budget: Budget) -> None:
    """plan: (row label, yaml, extra overrides, micro-batch) per row. FLOPs are counted once per config file,
    after its first row (so the row's timing runs first); every row of a config shares them (model FLOPs: the
    levers change time, not the model's math)."""
    print_header(f"{name} ({ctx['px']} px, {ctx['steps']} timed steps after {ctx['warmup']})", COLS)
    counted = rec.results.setdefault("flops", {})
    for label, yaml, extra, pairs in plan:
        flops = counted.get(yaml)
        row = {"part": name, "row": label, "pairs": pairs}
        if label == "compile":
            row["note"] = COMPILE_NOTE
        if not budget.allows(label):
            row["error"] = "skipped: over --budget-s"
            rec.record("train", row, COLS)
            continue
        args = overrides(ctx["folder"], ctx["data"], ctx["cache"], ctx["px"], pairs,
                         ctx["warmup"] + ctx["steps"], ctx["smoke"]) + extra
        if flops is None and label == "compile":  # counted eagerly first: after minutes of compiling, no time left
            _fresh(ctx["dev"])
            flops = counted[yaml] = guarded(step_flops, yaml, args, ctx["dev"], ctx["px"])
        _fresh(ctx["dev"])
        begin = time.perf_counter()
        measured = guarded(timed_row, yaml, args, ctx["out"], pairs, ctx["warmup"], ctx["peak"], flops)
        notes = [n for n in (row.get("note"), measured.get("note")) if n]  # a cut compile row keeps both
        row.update(measured, **({"note": "; ".join(notes)} if notes else {}))
        rec.record("train", row, COLS)
        if CUT:
            raise Cut()  # the row is kept; nothing more fits
        budget.last = time.perf_counter() - begin
        if flops is None and "error" not in row and budget.allows():
            _fresh(ctx["dev"])
            counted[yaml] = guarded(step_flops, yaml, args, ctx["dev"], ctx["px"])
            add_mfu(row, counted[yaml], ctx["peak"])  # this row ran before the count: filled in now
            rec.save()
            print(f"FLOPs ({yaml}): {counted[yaml]}; row above: TFLOP/s {row.get('tflops')}, MFU {row.get('mfu')}",
                  flush=True)
    print()


def skip_part(name: str, plan, rec: Recorder) -> None:
    """Every row of a part the budget has no room for, before its setup is paid."""
    print_header(f"{name}: skipped, over --budget-s", COLS)
    for label, _, _, pairs in plan:
        rec.record("train", {"part": name, "row": label, "pairs": pairs, "error": "skipped: over --budget-s"}, COLS)


def plans(smoke: bool) -> dict:
    """The rows of every part, most important part first; within the lever part sdpa-cudnn comes last."""
    x8 = 2 if smoke else 8
    return {
        # x8 first (measured in session 22: it checks the setup), then x32, the 30 pairs/s question, which
        # last in line was the row the budget dropped
        "sd15-lora": [(f"LoRA r8 x{b}", LORA, [], b) for b in ((1, 2) if smoke else (8, 32, 16, 4, 1))],
        "sd15-full": [(f"full x{x8}", FULL, NO_CKPT, x8)],
        "sdxl-lora": [(f"LoRA r8 ckpt x{b}", SDXL, [], b) for b in ((1, 2) if smoke else (1, 4))],
        "sd15-lever": [(label, LORA, extra, x8) for label, extra in LORA_LEVERS]
                      + [(label, FULL, NO_CKPT + extra, x8) for label, extra in FULL_LEVERS]
                      + [("sdpa-cudnn", LORA, ["model.attention=sdpa-cudnn"], x8)],
        "sd15-full-lever": [(label, FULL, NO_CKPT + extra, x8) for label, extra in FULL_LEVERS],
        "sd15-compile": [("compile", LORA, ["train.compile=true"], x8)],
    }


def main() -> None:
    out_dir = os.environ.get("OUT")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(Path(out_dir or ".") / "gpu_throughput.json"))
    parser.add_argument("--parts", default="sd15-lora,sd15-full,sdxl-lora",
                        help="comma-separated: sd15-lora, sd15-full, sdxl-lora, sd15-lever, sd15-full-lever, "
                        "sd15-compile")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip rows that would end after this")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the code paths only")
    args = parser.parse_args()
    parts = args.parts.split(",")
    all_plans = plans(args.smoke)
    unknown = [p for p in parts if p not in all_plans]
    if unknown:
        sys.exit(f"error: unknown --parts {unknown}; choose from {', '.join(all_plans)}")
    dev = _device(args.smoke)
    diffusers_version, transformers_version = _quiet_imports()
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke)"
    meta = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers_version,
            "transformers": transformers_version, "smoke": args.smoke,
            "steps": 2 if args.smoke else args.steps, "warmup": 1 if args.smoke else args.warmup,  # as run
            "peak_tflops": args.peak_tflops}
    rec = Recorder(Path(args.json), meta)
    print(f"# loop throughput, random weights | {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"diffusers {diffusers_version}\n", flush=True)
    budget, begin = Budget(args.budget_s), time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_parts(parts, all_plans, args, dev, rec, budget)
    except Cut:
        rec.save()
        sys.exit(f"cut by the time limit (SIGTERM); {rec.path} holds the rows done")
    meta["total_s"] = round(time.perf_counter() - begin, 1)
    rec.save()
    print(f"total {meta['total_s']} s; JSON: {rec.path}")


def run_parts(parts, all_plans, args, dev, rec, budget) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for part in parts:
            xl = part.startswith("sdxl")
            px = (128 if xl else 64) if args.smoke else (1024 if xl else 512)
            key = "sdxl" if xl else "sd15"
            budget.last = FIRST_ROW_S  # the previous part's rows say nothing of this part's first
            if not budget.allows(all_plans[part][0][0]):  # before the setup: SDXL's build takes ~20 s
                skip_part(part, all_plans[part], rec)
                continue
            if key not in rec.results["meta"]:
                start = time.perf_counter()
                folder = build_sdxl_folder(tmp, args.smoke, dev) if xl else build_folder(tmp, args.smoke, dev)
                data = write_pairs(tmp / f"pairs-{px}.parquet", 8 if args.smoke else 64, px)
                rec.results["meta"][key] = {"folder": str(folder), "data": str(data),
                                            "setup_s": round(time.perf_counter() - start, 1)}
            setup = rec.results["meta"][key]
            ctx = {"dev": dev, "folder": Path(setup["folder"]), "data": Path(setup["data"]), "cache": tmp / "cache",
                   "px": px, "out": tmp / "run", "smoke": args.smoke, "peak": args.peak_tflops,
                   "steps": 2 if args.smoke else args.steps, "warmup": 1 if args.smoke else args.warmup}
            run_part(part, all_plans[part], ctx, rec, budget)


if __name__ == "__main__":
    main()
