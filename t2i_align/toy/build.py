"""`python -m t2i_align.toy build`: train the toy world's models from scratch, on CPU, deterministically.

Four stages, each a plain training loop on rendered scenes:
1. the VAE (reconstruction + a small KL term, as SD's autoencoder without the GAN/LPIPS parts);
2. the toy CLIP (open_clip), contrastively, on clean captions and partial captions;
3. the UNet, with the ε-prediction loss on VAE latents, SD1.5's noise schedule and 10 % empty captions (so
   classifier-free guidance works), conditioned on the toy CLIP's frozen text tower, as SD1.5 is on OpenAI
   CLIP's. (A text encoder trained jointly from scratch encoded colour strongly and position hardly at all, and
   the UNet never learned the other attributes.) Captions carry deliberate label noise: every attribute but
   colour is replaced by a random value with probability `label_noise`. The base model therefore learns colour
   well and the rest only partly, leaving room for preference tuning to show an effect.
4. the toy Denscore (`denscore.py`), LongAlign's long-text reward: a copy of the toy CLIP fine-tuned so that every
   sentence of a long caption moves its score. The UNet never reads it.
Everything is written to a temporary folder and moved into place at the end, so a failed build leaves the
previous assets untouched.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..files import replace_dir
from ..weight_files import write_keys_as_before
from . import architectures as arch
from .assets import ASSETS_DIR, read_manifest, write_manifest
from .scenes import ATTRIBUTES, Scene, long_caption, noisy_scene, partial_caption, render, short_caption, split_scenes
from .tokenizer import build_clip_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, reused by the toy CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BuildBudget:
    num_images: int = 16000
    vae_steps: int = 1000
    vae_batch: int = 32
    unet_steps: int = 2500
    unet_batch: int = 64
    clip_steps: int = 800
    clip_batch: int = 128
    denscore_steps: int = 600
    denscore_batch: int = 32
    denscore_lr: float = 1e-3
    label_noise: float = 0.5
    """Probability that a training caption names a random value for each attribute except colour."""
    long_caption_prob: float = 0.2
    empty_caption_prob: float = 0.1


TINY_BUDGET = BuildBudget(num_images=64, vae_steps=2, vae_batch=8, unet_steps=2, unet_batch=8, clip_steps=2,
                          clip_batch=8, denscore_steps=2, denscore_batch=2)


def _render_dataset(n: int, rng: random.Random) -> Tuple[List[Scene], torch.Tensor]:
    train_scenes, _ = split_scenes()
    scenes = [train_scenes[rng.randrange(len(train_scenes))] for _ in range(n)]
    pixels = np.stack([render(s, rng) for s in scenes])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return scenes, x


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warmup then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _step(opt, params, loss, step, total, peak):
    for group in opt.param_groups:
        group["lr"] = _lr(step, total, peak)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_vae(x: torch.Tensor, b: BuildBudget, gen: torch.Generator, log: Callable) -> "arch.AutoencoderKL":
    vae = arch.toy_vae()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    for step in range(b.vae_steps):
        batch = x[torch.randint(len(x), (b.vae_batch,), generator=gen)]
        dist = vae.encode(batch).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # L1 + MSE keeps edges sharp enough for the judge to read small shapes.
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * dist.kl().mean()
        _step(opt, params, loss, step, b.vae_steps, 2e-3)
        if step % 100 == 0 or step == b.vae_steps - 1:
            log(f"vae step {step}/{b.vae_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    # SD's convention: scale latents to unit variance; the factor lives in the VAE config.
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae


def _caption(scene: Scene, b: BuildBudget, rng: random.Random) -> str:
    u = rng.random()
    if u < b.empty_caption_prob:
        return ""
    shown = noisy_scene(scene, rng, b.label_noise)
    if u < b.empty_caption_prob + b.long_caption_prob:
        return long_caption(shown, rng)
    return short_caption(shown)


def _tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_denoiser(vae, text_encoder, tokenizer, scenes, x, b: BuildBudget, rng: random.Random,
                   gen: torch.Generator, log: Callable):
    """UNet training with the ε-prediction MSE (DDPM, Ho et al. 2020, Eq. 14); the text encoder stays frozen."""
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
    scale = vae.config.scaling_factor
    unet, sched = arch.toy_unet(), arch.train_scheduler()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    for step in range(b.unet_steps):
        idx = torch.randint(len(x), (b.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(sched.config.num_train_timesteps, (b.unet_batch,), generator=gen)
        ids = _tokenize(tokenizer, [_caption(scenes[i], b, rng) for i in idx.tolist()])
        with torch.no_grad():
            hidden = text_encoder(ids).last_hidden_state
        pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred, noise)
        _step(opt, params, loss, step, b.unet_steps, 5e-4)
        if step % 100 == 0 or step == b.unet_steps - 1:
            log(f"unet step {step}/{b.unet_steps} loss {loss.item():.4f}")
    return unet.eval().requires_grad_(False)


def _clip_caption(scene: Scene, rng: random.Random) -> str:
    if rng.random() < 0.6:
        return short_caption(scene)
    return partial_caption(scene, rng.sample(ATTRIBUTES, rng.randint(1, 4)))


def train_toy_clip(tokenizer, scenes, x, b: BuildBudget, rng: random.Random, gen: torch.Generator,
                   log: Callable):
    """Contrastive training (CLIP, Radford et al. 2021): symmetric cross-entropy over the batch."""
    from open_clip.model import CLIP

    cfg = arch.toy_clip_config()
    model = CLIP(**cfg)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    for step in range(b.clip_steps):
        idx = torch.randint(len(x), (b.clip_batch,), generator=gen)
        images = ((x[idx] + 1) / 2 - mean) / std
        ids = _tokenize(tokenizer, [_clip_caption(scenes[i], rng) for i in idx.tolist()])
        img_f, txt_f, logit_scale = model(images, ids)
        logits = logit_scale * img_f @ txt_f.T
        labels = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        _step(opt, params, loss, step, b.clip_steps, 1e-3)
        if step % 100 == 0 or step == b.clip_steps - 1:
            log(f"clip step {step}/{b.clip_steps} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False), cfg


def _save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=arch.sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_keys_as_before(out / "text_encoder")  # the official key layout: transformers 4 loads it too
    # Keep the real SD1.5 tokenizer layout (vocab.json + merges.txt); tokenizer.json would add 3.6 MB.
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)


def _save_clip(out: Path, model, cfg: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    preprocess = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


STAGES = ("data", "vae", "denoiser", "clip", "denscore")  # append only: a stage's seed is its index


def _stage_random(seed: int, stage: str) -> Tuple[random.Random, torch.Generator]:
    """Independent RNGs per stage for its data and batches. The models' initial weights come from torch's global
    generator, seeded once per build: a stage rebuilt alone (`--only`) starts from other initial weights than in a
    full build (the shipped UNet is an `--only denoiser` build's; a full build does not reproduce it)."""
    stage_seed = seed * 100 + STAGES.index(stage)
    return random.Random(stage_seed), torch.Generator().manual_seed(stage_seed)


ONLY = ("denoiser", "denscore")
KEPT = {"denoiser": ("pipeline/vae/", "toy_clip/", "toy_denscore/"), "denscore": ("pipeline/", "toy_clip/")}
"""The asset folders `build --only X` keeps from the earlier build (the rest it writes anew)."""


def _reuse(previous: Path, log: Callable, only: str):
    """The VAE and toy CLIP (model + config) of an existing assets folder, for `build --only ...`."""
    from diffusers import AutoencoderKL
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    if not (previous / "manifest.json").is_file():
        raise ValueError(f"--only {only} needs existing assets in {previous} (no manifest.json there); "
                         "run a full build first")
    log(f"reusing the VAE and toy CLIP of {previous}")
    vae = AutoencoderKL.from_pretrained(str(previous / "pipeline" / "vae")).eval().requires_grad_(False)
    cfg = json.loads((previous / "toy_clip" / "open_clip_config.json").read_text())["model_cfg"]
    clip = CLIP(**cfg)
    clip.load_state_dict(load_file(str(previous / "toy_clip" / "open_clip_model.safetensors")))
    return vae, clip.eval().requires_grad_(False), cfg


def _denscore(tmp: Path, out_dir: Path, only, clip, clip_cfg, vae, seed: int, b: BuildBudget, log) -> bool:
    """Train the toy Denscore into tmp/toy_denscore, or keep out_dir's when only the UNet is rebuilt (the
    Denscore depends on the VAE and toy CLIP alone); True if it was kept."""
    from .denscore import train_toy_denscore

    if only == "denoiser" and (out_dir / "toy_denscore").is_dir():
        shutil.copytree(out_dir / "toy_denscore", tmp / "toy_denscore")
        return True
    model = train_toy_denscore(clip, clip_cfg, vae, b.denscore_steps, b.denscore_batch, b.denscore_lr,
                               *_stage_random(seed, "denscore"), log, CLIP_MEAN, CLIP_STD)
    _save_clip(tmp / "toy_denscore", model, clip_cfg)
    return False


def _meta(out_dir: Path, only, seed: int, budget: BuildBudget, seconds: float, kept_denscore: bool) -> dict:
    """The manifest's record of how the assets were made (which stages were kept from which build)."""
    meta = {"seed": seed, "budget": asdict(budget), "build_seconds": seconds}
    if only == "denoiser":
        meta["reused"] = {"from": read_manifest(out_dir).get("budget"),
                          "stages": ["vae", "clip"] + (["denscore"] if kept_denscore else [])}
    elif only == "denscore":  # everything else is the previous build's: keep its record, add the new stage's
        meta = {k: v for k, v in read_manifest(out_dir).items() if k != "files"}
        meta["budget"].update({k: v for k, v in asdict(budget).items() if k.startswith("denscore_")})
        meta["denscore"] = {"seed": seed, "build_seconds": seconds}
    return meta


def build(out_dir: str | os.PathLike = ASSETS_DIR, seed: int = 0, budget: BuildBudget = BuildBudget(),
          log: Callable = print, only: Optional[str] = None) -> Path:
    """Train every toy model and write the assets folder (pipeline/, toy_clip/, toy_denscore/, manifest.json)
    atomically.

    only="denoiser": retrain the UNet and keep the VAE, toy CLIP and toy Denscore already in out_dir;
    only="denscore": train the toy Denscore and keep everything else in out_dir.
    """
    if only not in (None,) + ONLY:
        raise ValueError(f"--only must be one of {ONLY}, got {only!r}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    try:
        torch.manual_seed(seed)
        if only == "denscore":
            vae, clip, clip_cfg = _reuse(out_dir, log, only)
            shutil.copytree(out_dir / "pipeline", tmp / "pipeline")
        else:
            tokenizer = build_clip_tokenizer(tmp / "pipeline" / "tokenizer")
            scenes, x = _render_dataset(budget.num_images, _stage_random(seed, "data")[0])
            if only == "denoiser":
                vae, clip, clip_cfg = _reuse(out_dir, log, only)
            else:
                vae = train_vae(x, budget, _stage_random(seed, "vae")[1], log)
                clip, clip_cfg = train_toy_clip(tokenizer, scenes, x, budget, *_stage_random(seed, "clip"), log)
            text_encoder = arch.text_encoder_from_clip(clip.state_dict())
            unet = train_denoiser(vae, text_encoder, tokenizer, scenes, x, budget,
                                  *_stage_random(seed, "denoiser"), log)
            _save_pipeline(tmp / "pipeline", vae, text_encoder, tokenizer, unet)
        _save_clip(tmp / "toy_clip", clip, clip_cfg)
        kept = _denscore(tmp, out_dir, only, clip, clip_cfg, vae, seed, budget, log)
        write_manifest(tmp, _meta(out_dir, only, seed, budget, round(time.time() - start, 1), kept))
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"toy assets written to {out_dir} in {time.time() - start:.0f} s")
    return out_dir
