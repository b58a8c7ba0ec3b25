"""SD 2.x-architecture folders (SD 2.1, SD-Turbo) are StableDiffusionPipelines and take the sd15 family's path:
linear-projection attention, another text width and a v-prediction schedule, here on a tiny random pipeline."""
import json

import numpy as np
import torch

from helpers import _sd_betas, _tiny_unet, one_torch_thread, tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae  # noqa: F401
from helpers import write_rendered_pairs
from t2i_align.config import load_config
from t2i_align.loop import train


def save_tiny_sd2(folder, prediction_type="v_prediction"):
    """SD 2.x's UNet differences (use_linear_projection, per-block head dims, 1024-wide text -> 48 here) and its
    v-prediction Euler scheduler with trailing timesteps (SD-Turbo's spacing)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    StableDiffusionPipeline(
        vae=tiny_vae(0), text_encoder=tiny_clip_text_encoder(tokenizer, 48), tokenizer=tokenizer,
        unet=_tiny_unet(0, cross_attention_dim=48, use_linear_projection=True, attention_head_dim=(2, 4)),
        scheduler=EulerDiscreteScheduler(prediction_type=prediction_type, timestep_spacing="trailing", **_sd_betas()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(str(folder))
    return folder


def test_an_sd2_v_prediction_folder_trains_dpo_on_the_turbo_recipe_and_samples(tmp_path, monkeypatch):
    from t2i_align import diffusion
    from t2i_align.sampling import generate, load_pipeline

    kinds = []
    original = diffusion.training_target
    monkeypatch.setattr(diffusion, "training_target", lambda s, *a: kinds.append(s.config.prediction_type)
                        or original(s, *a))
    model = save_tiny_sd2(tmp_path / "sd-turbo")
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=4, size=16)
    out = tmp_path / "run"
    final = train(load_config(None, [
        f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", "data.resolution=16",
        "train.batch_size=2", "lora.enabled=true", "train.max_steps=2", "train.log_every=1", "tracking.wandb=off",
        "tracking.sample_steps=1", "tracking.guidance_scale=0", "tracking.validation_seeds=1",
        "objective.timesteps=turbo", "objective.zero_terminal_snr=true", "objective.beta=100"])).final
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(losses[0] - np.log(2)) < 1e-4 and np.isfinite(losses[1])
    assert kinds and set(kinds) == {"v_prediction"}
    samples = generate(load_pipeline(model, lora=final), ["a red cat"], [0], num_inference_steps=1,
                       guidance_scale=0.0, height=16, width=16)
    assert samples.images.shape == (1, 3, 16, 16) and torch.isfinite(samples.images).all()
