"""The reward registry: `register(name)` on a Reward class, `get_reward(name, **options)` to build one.
base.py re-exports these, where rewards and callers import them from."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, Dict, List

_REGISTRY: Dict[str, Callable[..., Any]] = {}
_BUILTIN = ("toy", "clip", "decomposed_clip", "pickscore", "hpsv2", "aesthetic", "imagereward")


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


def differentiable_rewards() -> List[str]:
    """Names of the rewards whose scores keep the graph to tensor images (for reward-gradient fine-tuning)."""
    _load_builtin()
    return sorted(name for name, cls in _REGISTRY.items() if getattr(cls, "differentiable", False))


def get_reward(name: str, **options) -> Any:
    from .options import check_reward, expand_paths

    options = expand_paths(name, options)
    check_reward(name, options)
    return _REGISTRY[name](**options)


def _load_builtin() -> None:
    """Import every built-in reward module that exists (each registers itself); import errors propagate."""
    for module in _BUILTIN:
        if importlib.util.find_spec(f"{__package__}.{module}") is not None:
            importlib.import_module(f"{__package__}.{module}")
