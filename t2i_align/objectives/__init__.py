"""Training objectives, looked up by name (`objective.name` in the config); the loop never branches on names.

Adding a method = one module here with an `Objective` subclass, one entry in `_OBJECTIVES`, a config and tests.
"""
from __future__ import annotations

from typing import Dict, Type

from t2i_align.objectives.base import Denoiser, ImageBatch, Objective, PairBatch
from t2i_align.objectives.dpo import DPO, dpo_loss
from t2i_align.objectives.sft import SFT

_OBJECTIVES: Dict[str, Type[Objective]] = {"dpo": DPO, "sft": SFT}


def available_objectives() -> list:
    """The registered objective names, sorted."""
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """A fresh instance of the objective called `name`; ValueError listing the registered names otherwise."""
    try:
        return _OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available_objectives())}") from None


__all__ = ["DPO", "SFT", "Denoiser", "ImageBatch", "Objective", "PairBatch", "available_objectives", "dpo_loss",
           "get_objective"]
