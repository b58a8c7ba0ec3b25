"""The toy Denscore: a long-text preference model for the toy world, trained in the toy build.

LongAlign (Liu et al. 2024, arXiv 2410.11817, Sec. 5.1) fine-tunes its reward, Denscore, from CLIP-H "with a new
segment-level loss" that was never published. Its scoring is public (`loss.py::dense_score`): every sentence is
encoded alone, t = mean_k normalize(E_txt(s_k)), S = t · normalize(E_img(x)). The toy CLIP the UNet reads was
trained on short and partial captions and, scored that way on the long captions, sees mostly colour (held-out
image-side margins: colour 0.15, every other attribute ≤ 0.05; position below chance). Ascending it trades the
other sentences away, so LongAlign's stage 2 needs a reward that reads every sentence.

Our segment-level loss, on the same S the reward computes (so what is trained is exactly what is scored):
- contrastive (CLIP, Radford et al. 2021) over the batch's (image, long caption) pairs, logits = scale · S;
- per attribute, a Bradley–Terry preference (PickScore / HPS style) of the scene's image over a render of the same
  scene with that one attribute changed: softplus(-scale · (S(x, p) - S(x_a, p))). Every sentence's fact must
  move the score, so none can be traded for another.
It starts from a copy of the toy CLIP (as Denscore from CLIP-H); the toy CLIP itself is never retrained. Half the
images pass through the VAE and back, as generated images do, so the reward holds on decoded samples. Its
positives are training scenes only, but a counterfactual (one attribute changed) may be a held-out combination:
its image tower has seen held-out renders, as negatives,
before `benchmarks/longalign_toy.py retrieval` tests it on them (the shipped Denscore was trained so; not
redrawn, which would change every LongAlign number).

Known blind spot: left against right. The toy CLIP maps a position sentence and its left/right mirror alike
(cosine 0.998) and a render and its mirror alike (0.990), and fine-tuning does not separate them (top / bottom it
learns at once): with both towers blind to a difference, the loss's gradient along it vanishes for both, a saddle
that 600 steps do not leave. The reward therefore cannot see that half of the position sentence.
"""
from __future__ import annotations

import copy
import random
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import ATTRIBUTES, VALUES, Scene, long_caption, render, split_scenes


def counterfactual(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """The same scene with `attribute` set to a different value, drawn uniformly."""
    value = rng.choice([v for v in VALUES[attribute] if v != getattr(scene, attribute)])
    return Scene(**{**scene.as_dict(), attribute: value})


def dense_text(model, tokenizer, context_length: int, captions: Sequence[str]) -> torch.Tensor:
    """t per caption as the reward computes it (`mean_sentence_vectors`), with gradients through `model`."""
    from reward_models.decomposed_clip import mean_sentence_vectors

    def encode(sentences: List[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(sentences, context_length=context_length)), dim=-1)

    return mean_sentence_vectors(encode, captions)[0]


def renders(scenes: List[Scene], rng: Optional[random.Random]) -> torch.Tensor:
    """Scenes rendered as float images [N, 3, H, W] in [0, 1] (`rng` jitters the position; None: centred)."""
    pixels = np.stack([render(s, rng) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _roundtrip(vae, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1]; those where `keep` is False go through the VAE and back (generated images' blur)."""
    if vae is None or bool(keep.all()):
        return images
    with torch.no_grad():
        x = images[~keep] * 2 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    out = images.clone()
    out[~keep] = ((decoded + 1) / 2).clamp(0, 1)
    return out


def segment_loss(t: torch.Tensor, x: torch.Tensor, x_neg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t [B, D] caption vectors, x [B, D] their images, x_neg [B, A, D] one-attribute counterfactuals (all unit
    image embeddings). Contrastive over the batch + mean Bradley–Terry over (image, counterfactual) pairs."""
    logits = scale * t @ x.T
    labels = torch.arange(len(t))
    contrastive = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    margin = (t * x).sum(-1, keepdim=True) - torch.einsum("bd,bad->ba", t, x_neg)
    return contrastive + F.softplus(-scale * margin).mean()


def train_toy_denscore(clip, cfg: dict, vae, steps: int, batch: int, lr: float, rng: random.Random,
                       gen: torch.Generator, log: Callable, mean: Sequence[float], std: Sequence[float]):
    """Fine-tune a copy of the toy CLIP `clip` (open_clip CLIP with config `cfg`) with `segment_loss`, AdamW at
    peak `lr` with the toy build's warmup and cosine decay."""
    import open_clip

    from .build import _step

    context_length = cfg["text_cfg"]["context_length"]
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)  # what the reward loads it with
    model = copy.deepcopy(clip).train().requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    train_scenes, _ = split_scenes()
    for step in range(steps):
        scenes = [train_scenes[rng.randrange(len(train_scenes))] for _ in range(batch)]
        negatives = [counterfactual(sc, a, rng) for sc in scenes for a in ATTRIBUTES]
        images = renders(scenes + negatives, rng)
        # one VAE decision per scene, shared by its counterfactuals: blur alone must not tell them apart
        keep = torch.rand(batch, generator=gen) < 0.5
        keep = torch.cat([keep, keep.repeat_interleave(len(ATTRIBUTES))])
        images = _roundtrip(vae, images, keep)
        feats = F.normalize(model.encode_image((images - m) / s), dim=-1)
        t = dense_text(model, tokenizer, context_length, [long_caption(sc, rng) for sc in scenes])
        loss = segment_loss(t, feats[:batch], feats[batch:].view(batch, len(ATTRIBUTES), -1),
                            model.logit_scale.exp())
        _step(opt, params, loss, step, steps, lr)
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 100 == 0 or step == steps - 1:
            log(f"denscore step {step}/{steps} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def image_retrieval(reward, scenes: Sequence[Scene], progress: Optional[Callable[[int], object]] = None) -> dict:
    """Segment-level retrieval, image side (the choice a reward's gradient makes): per attribute, how often a
    scene's render outscores every render of it with that attribute changed, on its long caption, and the mean
    margin S(true) − mean S(changed); for position also how often the best render has the right half (top /
    bottom) and the right side (left / right). `reward`: a decomposed-clip (S = t·x, its ω aside). Renders are
    unjittered. `progress` is called with 1 after each scene (e.g. a tqdm bar's update)."""
    hits = {a: [] for a in ATTRIBUTES}
    margins = {a: [] for a in ATTRIBUTES}
    halves = {"top_bottom": [], "left_right": []}
    with torch.no_grad():
        for i, scene in enumerate(scenes):
            t = reward.text_vectors([long_caption(scene, random.Random(i))])[0][0]
            for a in ATTRIBUTES:
                variants = [Scene(**{**scene.as_dict(), a: v}) for v in VALUES[a]]
                scores = reward.encoder.encode_images(renders(variants, None)) @ t
                truth = VALUES[a].index(getattr(scene, a))
                best = int(scores.argmax())
                hits[a].append(best == truth)
                margins[a].append(float(scores[truth] - (scores.sum() - scores[truth]) / (len(scores) - 1)))
                if a == "position":
                    for j, key in enumerate(halves):  # "top left": word 0 is the half, word 1 the side
                        halves[key].append(VALUES[a][best].split()[j] == scene.position.split()[j])
            if progress is not None:
                progress(1)
    out = {a: {"accuracy": sum(hits[a]) / len(scenes), "margin": sum(margins[a]) / len(scenes),
               "chance": 1 / len(VALUES[a])} for a in ATTRIBUTES}
    out["position"].update({key: sum(v) / len(scenes) for key, v in halves.items()})
    return out
