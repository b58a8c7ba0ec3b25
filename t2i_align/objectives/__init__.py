"""Training objectives, looked up by name (`objective.name` in the config); the loop never branches on names.

Adding a method = one module here with an `Objective` subclass, one entry in `_OBJECTIVES`, a config and tests.
"""
from __future__ import annotations

from typing import Dict, Type

from t2i_align.objectives.base import Denoiser, ImageBatch, Objective, PairBatch, PromptBatch
from t2i_align.objectives.dpo import DPO, dpo_loss
from t2i_align.objectives.reward_backprop import RewardBackprop
from t2i_align.objectives.seppo import SePPO
from t2i_align.objectives.sft import SFT

_OBJECTIVES: Dict[str, Type[Objective]] = {"dpo": DPO, "sft": SFT, "seppo": SePPO,
                                       "reward_backprop": RewardBackprop}


def available_objectives() -> list:
    """The registered objective names, sorted."""
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """A fresh instance of the objective called `name`; ConfigError (a ValueError) listing the names otherwise."""
    try:
        return _OBJECTIVES[name]()
    except KeyError:
        from t2i_align.config import ConfigError

        raise ConfigError(f"objective.name = {name!r} is not an objective; available: "
                          f"{', '.join(available_objectives())}") from None


__all__ = ["DPO", "SFT", "SePPO", "RewardBackprop", "Denoiser", "ImageBatch", "Objective", "PairBatch", "PromptBatch",
           "available_objectives", "dpo_loss", "get_objective"]
