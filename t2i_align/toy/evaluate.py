"""Judge a model in the toy world: sample fixed prompt sets at fixed seeds and score every attribute."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..gallery import to_uint8
from ..sampling import Samples, generate, prompt_major
from ..stats import mean_ci
from .judge import Verdict, judge_batch
from .scenes import ATTRIBUTES, Scene, short_caption, split_scenes

# Sampling settings of every toy evaluation, so base and tuned models are always compared alike.
TOY_STEPS = 20
TOY_GUIDANCE = 3.0


def prompt_set(name: str) -> List[Scene]:
    """"heldout": the 60 scene combinations no fine-tuning data draws (the base's noisy captions spell 13 % of
    them: `scenes.split_scenes`); "train": the other 300."""
    train, heldout = split_scenes()
    sets = {"heldout": heldout, "train": train}
    if name not in sets:
        raise ValueError(f"unknown prompt set {name!r}; use one of {sorted(sets)}")
    return sets[name]


@dataclass
class Evaluation:
    summary: Dict
    samples: Samples
    scenes: List[Scene]
    verdicts: List[Verdict]


def summarize(verdicts: Sequence[Verdict]) -> Dict:
    """Per-attribute accuracy and the overall judge score (mean fraction of attributes right), with 95 % CIs."""
    per_attr = {a: mean_ci([float(v.correct[a]) for v in verdicts]) for a in ATTRIBUTES}
    return {"overall": mean_ci([v.score for v in verdicts]), "per_attribute": per_attr}


def evaluate(pipe, scenes: Sequence[Scene], seeds_per_prompt: int = 4, base_seed: int = 0,
             steps: int = TOY_STEPS, guidance: float = TOY_GUIDANCE, batch_size: int = 128,
             progress: Optional[Callable[[int], object]] = None) -> Evaluation:
    """Sample `seeds_per_prompt` images per scene's short caption at fixed seeds and judge them.

    `progress` is passed to `generate`: called with the number of images finished after each batch."""
    flat_scenes, flat_seeds = prompt_major(scenes, seeds_per_prompt, base_seed)
    prompts = [short_caption(s) for s in flat_scenes]
    samples = generate(pipe, prompts, flat_seeds, num_inference_steps=steps, guidance_scale=guidance,
                       batch_size=batch_size, progress=progress)
    verdicts = judge_batch(to_uint8(samples.images), flat_scenes)
    summary = summarize(verdicts)
    summary.update(num_prompts=len(scenes), seeds_per_prompt=seeds_per_prompt, base_seed=base_seed,
                   steps=steps, guidance=guidance)
    return Evaluation(summary, samples, flat_scenes, verdicts)


def judge_scores(evaluation: Evaluation) -> np.ndarray:
    return np.array([v.score for v in evaluation.verdicts])
