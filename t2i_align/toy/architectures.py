"""Tiny architectures of the toy world: the real diffusers / transformers / open_clip classes at toy size.

Images are 32x32 RGB; the VAE downsamples by 2 into 4x16x16 latents; the text encoder is the toy CLIP's 3-layer
text transformer with the full CLIP vocabulary (49,408 tokens) and a 77-token context, as in SD1.5.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .scenes import IMAGE_SIZE
from .tokenizer import CONTEXT_LENGTH

VOCAB_SIZE = 49408
TEXT_DIM = 32
LATENT_CHANNELS = 4
# SD1.5's noise schedule, so the toy exercises the same timestep / noise math as the real model.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
TOY_CLIP_NAME = "t2i-toy-clip"


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def toy_text_encoder() -> CLIPTextModel:
    """The toy CLIP's text tower (`toy_clip_config`) as a transformers CLIPTextModel: SD1.5 conditions on OpenAI
    CLIP's frozen text tower, and the toy pipeline does the same with the toy CLIP's (`text_encoder_from_clip`)."""
    text = toy_clip_config()["text_cfg"]
    cfg = CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"], hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=toy_clip_config()["embed_dim"],
    )
    return CLIPTextModel(cfg)


def text_encoder_from_clip(clip_state: dict) -> CLIPTextModel:
    """The toy pipeline's text encoder with the weights of a toy open_clip model's text tower."""
    from reward_models.pickscore import open_clip_to_hf_clip

    encoder = toy_text_encoder()
    # transformers 5 dropped the "text_model." level of CLIPTextModel's keys; older versions keep it.
    keep_prefix = any(k.startswith("text_model.") for k in encoder.state_dict())
    hf = {(k if keep_prefix else k[len("text_model."):]): v
          for k, v in open_clip_to_hf_clip(clip_state).items() if k.startswith("text_model.")}
    encoder.load_state_dict(hf, strict=True)
    return encoder.eval().requires_grad_(False)


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        # Attention only at 8x8 and 4x4: at 16x16 it would triple the CPU cost for little gain on toy scenes.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "set_alpha_to_one"})


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE)


def toy_clip_config() -> dict:
    """open_clip model config of the toy CLIP: a ViT on 4x4 patches and a small text transformer."""
    return {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 96, "patch_size": 4, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 4,
                     "layers": 3},
    }
