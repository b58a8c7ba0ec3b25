"""How far the toy UNet's generated latents lie from the VAE encoder's latents of the same decoded images (the
reason `raft.reencode` exists). Control: the same decode -> encode round trip for VAE latents of rendered data.
Prints JSON.

    python benchmarks/toy_reencode_gap.py [--images 64] [--seed 0]
"""
import argparse
import json
import random

import numpy as np
import torch

from t2i_align.sampling import generate, load_pipeline, prompt_major
from t2i_align.toy.evaluate import TOY_GUIDANCE, TOY_STEPS, prompt_set
from t2i_align.toy.scenes import render, short_caption


@torch.no_grad()
def encode_mean(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of [-1, 1] pixels, scaled like the UNet's latents."""
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = load_pipeline("toy", None, "cpu", "ddim")
    scenes = prompt_set("train")[:args.images]
    prompts, seeds = prompt_major([short_caption(s) for s in scenes], 1, args.seed)
    samples = generate(pipe, prompts, seeds, num_inference_steps=TOY_STEPS, guidance_scale=TOY_GUIDANCE)
    generated = samples.latents
    reencoded = encode_mean(pipe, samples.images * 2 - 1)
    rng = random.Random(args.seed)
    data = np.stack([render(s, rng) for s in scenes])
    data_latents = encode_mean(pipe, torch.from_numpy(data).permute(0, 3, 1, 2).float() / 127.5 - 1)
    with torch.no_grad():
        decoded = (pipe.vae.decode(data_latents / pipe.vae.config.scaling_factor).sample).clamp(-1, 1)
    roundtrip = encode_mean(pipe, decoded)  # control: how lossy decode -> encode is for data latents
    rms = lambda x: round(float(x.pow(2).mean().sqrt()), 4)  # noqa: E731
    print(json.dumps({
        "images": args.images, "seed": args.seed, "steps": TOY_STEPS, "guidance": TOY_GUIDANCE,
        "generated_latent_std": round(float(generated.std()), 4),
        "reencoded_latent_std": round(float(reencoded.std()), 4),
        "data_latent_std": round(float(data_latents.std()), 4),
        "rms_generated_minus_reencoded": rms(generated - reencoded),
        "rms_data_minus_roundtrip": rms(data_latents - roundtrip),
    }, indent=2))


if __name__ == "__main__":
    main()
