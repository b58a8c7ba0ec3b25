"""One reward interface: `reward(images, prompts) -> (scores, info)`, looked up by name (ddpo-pytorch style).

Images are PIL images or a float tensor [B, 3, H, W] in [0, 1]; scores are a float tensor [B]; `info` holds
per-image extras (e.g. per-attribute verdicts). Rewards whose image side carries gradients set
`differentiable = True`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

RewardOutput = Tuple[torch.Tensor, Dict[str, Any]]


class Reward:
    """Base class: subclasses implement `score(images, prompts)`; `__call__` checks the inputs."""

    name: str = ""
    differentiable: bool = False

    def __call__(self, images, prompts: Sequence[str]) -> RewardOutput:
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n != len(prompts):
            raise ValueError(f"reward {self.name!r} got {n} images but {len(prompts)} prompts")
        return self.score(images, list(prompts))

    def score(self, images, prompts: List[str]) -> RewardOutput:
        raise NotImplementedError


_REGISTRY: Dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Class decorator: make a Reward constructible as `get_reward(name, **options)`."""
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_rewards() -> List[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_reward(name: str, **options) -> Reward:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def _load_builtin() -> None:
    from . import toy  # noqa: F401  (registers toy-judge)
