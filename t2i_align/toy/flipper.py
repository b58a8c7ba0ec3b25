"""How often SePPO's anchor-based flipper agrees with the toy judge, a check no paper could make.

For preferred images of a pair file (the anchors), the reference (the base model: adapters off) samples one image
per caption exactly as SePPO training does (DDIM, CFG, re-encoded); the judge scores the anchor and the sample.
The judge calls the sample a LOSER when it scores below its anchor. The flipper calls it a loser (s = +1) when the
policy's denoising error on the anchor is below the reference's at one draw (ε, t), as in training; we also
report the verdict from the mean over `draws` draws (what the criterion could do with less noise).

    python -m t2i_align.toy.flipper --lora runs/toy-seppo/final --pairs runs/toy-pairs-k8/pairs.parquet
"""
from __future__ import annotations

import argparse
import io
import json
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ..batches import encode_images, make_denoiser
from ..conditioning.text import encode_prompts
from ..gallery import to_uint8
from ..adapters import adapters_off
from ..objectives.seppo import anchor_error_draws
from ..rollout import decode, initial_latents, rollout
from ..sampling import load_pipeline, pipeline_components
from .judge import judge_batch
from .scenes import scene_from_caption


def read_anchors(path: str, n: int) -> Dict[str, list]:
    """The first n (caption, preferred image) of a toy pair file; ties skipped."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist()
    captions, images = [], []
    for row in rows:
        if row["label_0"] == 0.5:
            continue
        jpg = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        captions.append(row["caption"])
        images.append(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))
        if len(captions) == n:
            break
    return {"captions": captions, "images": images}


@torch.no_grad()
def check(lora: Optional[str], pairs: str, n: int = 256, steps: int = 10, guidance: float = 3.0, draws: int = 16,
          seed: int = 0, batch: int = 64) -> Dict:
    pipe = load_pipeline("toy", lora=lora)
    comp = pipeline_components(pipe)
    unet = pipe.unet.eval()
    policy = make_denoiser(unet, comp)

    def reference(noisy, t, embeds, time_ids=None):
        if lora is None:  # the base against itself
            return policy(noisy, t, embeds, time_ids)
        with adapters_off(unet):
            return policy(noisy, t, embeds, time_ids)

    data = read_anchors(pairs, n)
    judge_anchor, judge_sample, one_draw, mean_draw = [], [], [], []
    # streams of their own: the draws share no noise with the starts
    starts, draw_noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):  # the VAE posterior samples from it: seeded, the caller's left alone
        torch.default_generator.manual_seed(seed + 2)  # the CPU's only: fork_rng restores no CUDA state
        for i in range(0, len(data["captions"]), batch):
            caps = data["captions"][i:i + batch]
            pixels = torch.from_numpy(np.stack(data["images"][i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
            lw = encode_images(comp, pixels)
            embeds = encode_prompts(comp, caps)
            x_t = initial_latents(lw.shape, starts, comp.scheduler)
            sample = rollout(reference, embeds, encode_prompts(comp, [""]), comp.scheduler, x_t, num_steps=steps,
                             guidance_scale=guidance)
            images = to_uint8((decode(comp.vae, sample, grad=False).clamp(-1, 1) + 1) / 2)
            scenes = [scene_from_caption(c) for c in caps]
            judge_anchor += [v.score for v in judge_batch(to_uint8((pixels + 1) / 2), scenes)]
            judge_sample += [v.score for v in judge_batch(images, scenes)]
            pol, ref = anchor_error_draws(policy, reference, comp.scheduler, lw, embeds, draws, draw_noise)
            one_draw += ((ref[0] - pol[0]) > 0).tolist()
            mean_draw += ((ref.mean(0) - pol.mean(0)) > 0).tolist()
    return summarize(np.array(judge_anchor), np.array(judge_sample), np.array(one_draw), np.array(mean_draw))


def summarize(anchor: np.ndarray, sample: np.ndarray, one: np.ndarray, mean: np.ndarray) -> Dict:
    loser = sample < anchor
    return {"n": int(len(anchor)), "judge_says_loser": float(loser.mean()),
            "flipper_says_loser_one_draw": float(one.mean()), "flipper_says_loser_mean_draws": float(mean.mean()),
            "agreement_one_draw": float((one == loser).mean()), "agreement_mean_draws": float((mean == loser).mean()),
            "anchor_judge_mean": float(anchor.mean()), "sample_judge_mean": float(sample.mean())}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", default=None, help="the SePPO policy's final/ (none: the base, a tie everywhere)")
    p.add_argument("--pairs", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(check(args.lora, args.pairs, args.n, args.steps, args.guidance, args.draws, args.seed), indent=2))


if __name__ == "__main__":
    main()
