"""Toy-world rewards: `toy-judge`, the programmatic ground truth (fraction of the five attributes right)."""
from __future__ import annotations

from typing import List

import torch

from t2i_align.gallery import to_uint8
from t2i_align.toy.judge import judge_batch
from t2i_align.toy.scenes import scene_from_caption

from .base import Reward, RewardOutput, register


@register("toy-judge")
class ToyJudge(Reward):
    """Scores an image against the scene its (toy short) caption describes. Not differentiable."""

    def score(self, images, prompts: List[str]) -> RewardOutput:
        scenes = [scene_from_caption(p) for p in prompts]
        verdicts = judge_batch(to_uint8(images), scenes)
        scores = torch.tensor([v.score for v in verdicts], dtype=torch.float32)
        return scores, {"correct": [v.correct for v in verdicts]}
