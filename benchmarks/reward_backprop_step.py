"""Time and peak memory of one reward-backprop step: DDIM rollout -> VAE decode -> reward -> backward.

The question it answers: does memory grow with the number of steps that carry gradients (it should), or with the
length of the sampling chain (it should not)? Configurations: a 20- and a 50-step chain with gradients on the last
step only, the 50-step chain with LongAlign's 5 strided steps and with all 50 (AlignProp), each with and without
gradient checkpointing (the UNet on gradient steps and the VAE decode). The UNet input is detached on gradient
steps (LongAlign; `t2i_align/rollout.py`). LoRA rank 8 on the attention projections is what trains; the reward
is `decomposed-clip` on the toy CLIP with a common direction fitted once and loaded from a file, as a run does.

Models: `toy` (the shipped toy pipeline, 32 px, 4x16x16 latents; CPU or GPU) and `sd15-mid` (random weights in
SD1.5's UNet layout at reduced width and SD1.5's VAE layout, 512 px, 4x64x64 latents; GPU only).
Each configuration runs in its own process after a warm-up step (a 2-step chain); one timed step, so
times on a shared machine are rough. Peak memory: on CUDA the
`torch.cuda.max_memory_allocated` increase over the step; on CPU the peak-RSS increase over the step (VmHWM reset
through /proc/self/clear_refs; glibc told to return freed memory). Also, exact on both: the tensor bytes
autograd keeps for backward at the end of the forward pass (saved-tensor hooks). On CPU the RSS column also
holds the graph's host-side bookkeeping (autograd nodes, checkpoint holders): with checkpointing it still grows
by about 1 MiB per gradient step on the toy UNet (a third of it Python objects, by tracemalloc) while the kept
tensor bytes stay flat; on a GPU that bookkeeping is host memory, not device memory.

    python benchmarks/reward_backprop_step.py [--model toy|sd15-mid] [--batch 1] [--threads 1]

Prints a Markdown table and writes benchmarks/results/reward_backprop_step_<model>_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = [  # (chain length, gradient-step mode, k)
    (20, "last", 1), (50, "last", 1), (50, "strided", 5), (50, "all", 50),
]
FIT_PROMPTS = ["a small red circle at the top left on a white background", "a large blue square. On black.",
               "a green triangle at the bottom right; the background is grey"]


def toy_parts(device):
    from diffusers import StableDiffusionPipeline

    from t2i_align.toy.assets import pipeline_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir()), safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(FIT_PROMPTS[:1], device, 1, True, negative_prompt=[""])
    return pipe.unet, pipe.vae, pipe.scheduler, cond, uncond


def sd15_mid_parts(device):
    """SD1.5's UNet layout (4 levels, 2 layers each, cross-attention 768) at half width (~1/4 of its 860M
    parameters) and SD1.5's VAE layout at full width; random weights, random 77-token text embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(160, 320, 640, 640), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8).to(device)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).to(device)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(1, 77, 768, generator=gen).to(device) for _ in range(2))
    return unet, vae, scheduler, cond, uncond


def run_one(model: str, chain: int, mode: str, k: int, ckpt: bool, batch: int, direction: str) -> dict:
    from peft import LoraConfig

    from reward_models import get_reward
    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.rollout import choose_grad_steps, decode, initial_latents, rollout

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, vae, scheduler, cond, uncond = (toy_parts if model == "toy" else sd15_mid_parts)(device)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    reward = get_reward("decomposed-clip", checkpoint="toy", direction=direction, device=device)
    embeds, empty = PromptEmbeds(cond.repeat(batch, 1, 1)), PromptEmbeds(uncond)
    shape = (batch, 4, unet.config.sample_size, unet.config.sample_size)
    gen = torch.Generator().manual_seed(0)

    def denoiser(x, t, e, time_ids=None):
        return unet(x, t, encoder_hidden_states=e.prompt_embeds).sample

    def step(chain=chain, mode=mode, k=k, saved=None):
        steps = choose_grad_steps(mode, chain, k, gen)
        with saved or contextlib.nullcontext():
            x0 = rollout(denoiser, embeds, empty, scheduler, initial_latents(shape, gen, scheduler, device),
                         num_steps=chain, guidance_scale=7.5, grad_steps=steps, detach_input=True, checkpoint=ckpt)
            images = decode(vae, x0, grad=True, checkpoint=ckpt)
            scores, _ = reward(images / 2 + 0.5, FIT_PROMPTS[:1] * batch)
        (-scores.mean()).backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        for p in params:
            p.grad = None
        return grad_norm

    step(2, "all", 2)  # warm-up (a 2-step chain is enough): lazy initialisation, allocator pools
    saved = SavedForBackward({p.untyped_storage().data_ptr() for p in unet.parameters()})
    before = _memory_now(device)
    start = time.perf_counter()
    grad_norm = step(saved=saved)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"s_per_step": seconds, "peak_extra_mib": (_memory_peak(device) - before) / 2**20,
            "saved_for_backward_mib": saved.nbytes / 2**20,
            "grad_norm": grad_norm, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for backward (each storage once, parameters excluded): exact and
    allocator-independent, unlike RSS. Inside a checkpointed region checkpoint's own hooks take over, so what it
    does not keep is not counted, as it should be."""

    def __init__(self, exclude: set):
        self.storages, self.exclude = {}, exclude

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:  # alive until backward, so a pointer is not reused meanwhile
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _memory_now(device: str) -> int:
    """Bytes in use now, after resetting the peak counter."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    return _status_kib("VmRSS") * 1024


def _memory_peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":"))
    return int(line.split()[1])


def fit_direction(folder: Path) -> str:
    """Fit decomposed-clip's common direction once and save it, as a run does before training."""
    from reward_models import get_reward

    path = folder / "direction.safetensors"
    get_reward("decomposed-clip", checkpoint="toy", fit_prompts=FIT_PROMPTS, device="cpu").save_direction(path)
    return str(path)


def child(args, spec: list) -> dict:
    # glibc: large blocks from mmap and a trimmed heap, so memory freed by the step leaves the RSS
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(args.threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": "out of memory" if "OutOfMemory" in out.stderr else tail[0][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("toy", "sd15-mid"), default="toy")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    if args.model == "sd15-mid" and not torch.cuda.is_available():
        sys.exit("--model sd15-mid needs a GPU (a 512 px rollout with gradients is far too slow on a CPU)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        direction = fit_direction(Path(tmp))
        print(f"Reward-backprop step ({args.model}), batch {args.batch}, CFG 7.5, LoRA r8, torch {torch.__version__}, "
              f"{'CUDA' if torch.cuda.is_available() else f'CPU ({platform.machine()}), {args.threads} thread(s)'}"
              "\n\n| chain | gradient steps | checkpointing | s/step | kept for backward (MiB) "
              "| peak memory increase (MiB) |\n|---|---|---|---|---|---|")
        for chain, mode, k in CONFIGS:
            for ckpt in (False, True):
                r = child(args, [args.model, chain, mode, k, ckpt, args.batch, direction])
                rows.append(dict(chain=chain, mode=mode, grad_steps=k, checkpoint=ckpt, **r))
                cells = (f"{r['s_per_step']:.2f} | {r['saved_for_backward_mib']:.1f} | {r['peak_extra_mib']:.1f}"
                         if "error" not in r else f"{r['error']} | – | –")
                print(f"| {chain} | {k} ({mode}) | {'on' if ckpt else 'off'} | {cells} |", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = ROOT / "benchmarks" / "results" / f"reward_backprop_step_{args.model}_{device}.json"
    from t2i_align.files import write_text_atomic  # a result file whole or not at all
    write_text_atomic(out, json.dumps({"model": args.model, "batch": args.batch, "threads": args.threads,
                                       "torch": torch.__version__, "machine": platform.machine(), "rows": rows},
                                      indent=1))
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
