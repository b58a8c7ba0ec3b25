"""Tiny random diffusers pipelines for tests (no network, no downloaded weights).

`tiny_sd15_pipeline()` and `tiny_sdxl_pipeline()` build genuine diffusers pipelines whose components have the
real classes and wiring of SD1.5 / SDXL but only a few thousand parameters, so a save -> load -> forward round
trip takes well under a second on CPU. `save_tiny_pipeline(family, folder)` writes one as a diffusers folder.
"""
from __future__ import annotations

import json
import random
import string
import tempfile
from pathlib import Path

import pytest
import torch

from t2i_align.config import load_config
from t2i_align.toy.pairs import jpeg_bytes, write_parquet
from t2i_align.toy.scenes import noisy_scene, render, short_caption, split_scenes

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread (import this fixture into the test module).

    On a busy 2-core machine a tiny UNet forward took 1.9 s with 2 OpenMP threads and 0.01 s with 1: the
    threads spin against each other for kernels far too small to split.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


MAX_TOKENS = 77
"""Same context length as real CLIP, so truncation behaves as it would with real weights."""


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A character-level CLIP BPE tokenizer written as vocab.json + merges.txt (the real on-disk format).

    Every lowercase letter/digit/punctuation mark is a token (alone and word-final), plus a few merges so that
    common test words ("a", "cat", "photo") are single tokens. SDXL's second tokenizer pads with "!".
    """
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?-'")
    merges = ["c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS, pad_token=pad_token)


def tiny_clip_text_encoder(tokenizer, hidden: int = 32, with_projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder; `with_projection` gives SDXL's CLIPTextModelWithProjection (text_embeds)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_vae(seed: int = 0):
    """Two-block AutoencoderKL: 4 latent channels, spatial factor 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def _tiny_unet(seed: int, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32,
    )
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)


def _sd_betas() -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tiny_sd15_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with tiny random components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_clip_text_encoder(tokenizer, 32, seed=seed), tokenizer=tokenizer,
        unet=_tiny_unet(seed), scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_sd_betas()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline: two encoders (hidden 32 + 32 -> cross-attention 64), pooled dim 32 and
    text_time added conditioning (6 time ids x 8 + 32 pooled = 80 inputs), as in diffusers' own SDXL tests."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    unet = _tiny_unet(
        seed, cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 2),
        norm_num_groups=1,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), unet=unet, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=tiny_clip_text_encoder(tokenizer, 32, seed=seed),
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, 32, with_projection=True, seed=seed + 1),
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **_sd_betas()),
    )


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny "sd15" or "sdxl" pipeline as a diffusers folder (with model_index.json); returns the folder."""
    builders = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
    builders[family](seed=seed).save_pretrained(str(folder))
    return Path(folder)


def export_random_lora(model: Path, folder: Path, *overrides: str) -> Path:
    """A rank-4 LoRA on `model` with random lora_B (a fresh LoRA is a no-op), exported as a run's final/ would be
    (`overrides`: more config settings, e.g. the text encoding it records). Returns the export folder."""
    from t2i_align.adapters import add_lora
    from t2i_align.checkpoints import export_final
    from t2i_align.config import load_config
    from t2i_align.models import build_pipeline, load_components

    cfg = load_config(None, [f"model.pretrained={model}", "lora.enabled=true", "lora.rank=4", *overrides])
    comps = load_components(cfg.model)
    add_lora(comps.unet, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return export_final(build_pipeline(comps, unet=comps.unet), comps.unet, True, folder)


def thread_team(world):
    """Team members (`cache_build.Team`) for `world` threads standing in for processes: a barrier; `share` and
    `gather` through slots (rank 0's, or one each)."""
    import threading

    from t2i_align.data.cache_build import Team

    barrier, slots = threading.Barrier(world, timeout=60), [None] * world

    def member(rank):
        def gather(value):
            slots[rank] = value
            barrier.wait()
            out = list(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read them
            return out

        return Team(rank, world, barrier.wait, lambda value: gather(value)[0], gather)
    return [member(rank) for rank in range(world)]


def plain_lora_kwargs() -> dict:
    """What plain diffusers needs to load a LoRA export folder here: before 0.40 (transformers 4 resolves to it)
    the weights file must be named under HF_HUB_OFFLINE (README, "Real weights")."""
    import diffusers

    old = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) < (0, 40)
    return {"weight_name": "pytorch_lora_weights.safetensors"} if old else {}


def write_rendered_pairs(path, n=8, size=16, seed=0, tie_every=0):
    """Winner = the captioned scene, loser = the scene with attributes changed (ground-truth preferences)."""
    rng = random.Random(seed)
    train_scenes, _ = split_scenes()
    rows = []
    for i in range(n):
        scene = rng.choice(train_scenes)
        wrong = noisy_scene(scene, rng, 1.0, keep=())
        label = 0.5 if tie_every and i % tie_every == 0 else float(i % 2)
        win, lose = jpeg_bytes(render(scene, rng, size)), jpeg_bytes(render(wrong, rng, size))
        a, b = (win, lose) if label != 0.0 else (lose, win)
        rows.append({"caption": short_caption(scene), "jpg_0": a, "jpg_1": b, "label_0": label,
                     "label_1": 1 - label, "user_id": 0, "are_different": True, "has_label": True,
                     "model_0": "render", "model_1": "render", "ranking_id": i})
    write_parquet(rows, path)
    return path


def loop_cfg(model, data, out, *extra):
    """The loop's config for a 16 px run of tiny `model` on pair file `data` into `out`, `extra` overrides."""
    return load_config(None, [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}",
                              "data.resolution=16", "train.batch_size=2", "train.learning_rate=1e-3",
                              "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1",
                              *extra])


def logged_losses(out):
    """The losses metrics.jsonl in `out` logged, one per line."""
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
