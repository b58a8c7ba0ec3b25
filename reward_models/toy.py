"""Toy-world rewards: `toy-judge`, the programmatic ground truth (fraction of the five attributes right)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from t2i_align.gallery import to_uint8
from t2i_align.toy.judge import judge_batch
from t2i_align.toy.scenes import scene_from_caption

from .base import PromptsRejected, Reward, RewardOutput, register, to_image_tensors


def _uint8_hwc(images) -> List[np.ndarray]:
    """Any image input the rewards take (`base.to_image_tensors`: RGB in [0, 1]) as uint8 HWC arrays, the
    judge's reading (8-bit inputs come back exactly). A numpy batch channels-first (`gallery.to_uint8`'s [B, 3, H, W]
    float array) is read as the tensor it mirrors."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] in (1, 3, 4) \
            and images.shape[-1] not in (1, 3, 4):
        images = torch.from_numpy(np.ascontiguousarray(images))
    tensors = to_image_tensors(images)
    if isinstance(tensors, torch.Tensor):
        return to_uint8(tensors)
    return [to_uint8(t[None])[0] for t in tensors]


@register("toy-judge")
class ToyJudge(Reward):
    """Scores an image against the scene its toy caption (short, or the six-sentence long one) describes. Not
    differentiable."""

    def check_prompts(self, prompts: Sequence[str]) -> None:
        bad = []
        for prompt in prompts:
            try:
                scene_from_caption(prompt)
            except ValueError:
                bad.append(prompt)
        if bad:
            # a 500-word caption was shown whole: an error line of 2.9 kB
            shown = ", ".join(repr(p if len(p) <= 80 else p[:77] + "...") for p in bad[:3]) + \
                (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise PromptsRejected(f"toy-judge scores only toy captions such as 'a small red circle at the top left "
                                  f"on a white background' (or their long form, toy:heldout-long); {len(bad)} of "
                                  f"{len(prompts)} prompts are not: {shown}")

    def score(self, images, prompts: List[str]) -> RewardOutput:
        scenes = [scene_from_caption(p) for p in prompts]
        verdicts = judge_batch(_uint8_hwc(images), scenes)
        scores = torch.tensor([v.score for v in verdicts], dtype=torch.float32)
        return scores, {"correct": [v.correct for v in verdicts]}
