"""What a reward is given before it loads: its name, its options (names and types, from its constructor) and the
local weights its path options name (checked before a run loads its model), "~" in them expanded."""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Dict

from .base import _REGISTRY, RewardSetupError, WeightsNotFoundError, _load_builtin


def expand_paths(name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """`options` with its path options' "~" expanded and numbers as text (a config's `checkpoint=2024` is an int),
    as `t2i-score --option` gives them."""
    _load_builtin()
    paths = getattr(_REGISTRY.get(name), "paths", {})
    textual = (str, int, float)  # not a bool
    return {k: os.path.expanduser(str(v)) if k in paths and isinstance(v, textual) and not isinstance(v, bool) else v
            for k, v in options.items()}


def reward_on(name: str, options: Dict[str, Any], device):
    """`get_reward(name, **options)` placed on `device` when it takes one and the options name none (each process
    scores on its own)."""
    from .base import get_reward

    if reward_accepts(name, "device") and "device" not in options:
        options = {**options, "device": device}
    return get_reward(name, **options)


def check_reward(name: str, options: Dict[str, Any], paths: bool = True) -> None:
    """RewardSetupError for an unknown name or options the reward does not take, WeightsNotFoundError (`paths`)
    for weights not there; nothing is loaded (a run checks its rewards before loading its model)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise RewardSetupError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    check_options(name, options)
    if paths:
        _check_paths(_REGISTRY[name], expand_paths(name, options))


def _names_weights(cls, key: str, value: str) -> bool:
    """Whether a path option's value is a name the reward knows rather than a path."""
    if value in cls.path_names:
        return True
    if key == "checkpoint" and cls.open_clip_checkpoint:
        import open_clip

        return value in {tag for _, tag in open_clip.list_pretrained()}
    return False


def _check_paths(cls, options: Dict[str, Any]) -> None:
    """WeightsNotFoundError for a path option that names nothing, or a needed one not given."""
    for key, source in getattr(cls, "paths", {}).items():
        value, expected = options.get(key), f". Expected: {source}" if source else ""
        if value is None and source:
            raise WeightsNotFoundError(f"reward {cls.name!r}: no {key} was given (its local weights: nothing is "
                                       f"downloaded){expected}")
        if isinstance(value, str) and not _names_weights(cls, key, value) and not Path(value).exists():
            raise WeightsNotFoundError(f"reward {cls.name!r}: {key}={value} does not exist{expected}")


def check_options(name: str, options: Dict[str, Any]) -> None:
    """RewardSetupError naming the options reward `name` does not take (a bare TypeError otherwise) and those it
    does."""
    params = inspect.signature(_REGISTRY[name]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    bad = [key for key in options if key not in params]
    if bad:
        raise RewardSetupError(f"reward {name!r} has no option(s) {bad}; it takes: {', '.join(params) or 'none'}")
    for key, value in options.items():
        _check_option_type(name, key, value, params[key].default)
        _check_option_range(_REGISTRY[name], key, value)


def _check_option_range(cls, key: str, value: Any) -> None:
    """A number option outside its reward's `option_ranges` (omega=5 passed a dry run, failing once the model had
    loaded; a reward without the check would have taken it)."""
    if key in cls.option_ranges and isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high, meaning = cls.option_ranges[key]
        if not low <= value <= high:
            raise RewardSetupError(f"reward {cls.name!r} option {key}={value} is outside [{low:g}, {high:g}] "
                                   f"({meaning})")


def _check_option_type(name: str, key: str, value: Any, default: Any) -> None:
    """An option whose default is a bool / int / float takes that type (`batch_size=8x` failed only while scoring,
    each batch's error taken for a rejected prompt); a batch size must be >= 1 (it silently became 1); a number
    option is not none (a TypeError) and is finite (`scale=nan` flagged every image as not finite)."""
    kind = type(default)
    if value is None and kind in (bool, int, float):
        raise RewardSetupError(f"reward {name!r} option {key}=none: it takes a value (default {default!r}); leave it "
                               "out for the default")
    if isinstance(value, float) and not math.isfinite(value):
        raise RewardSetupError(f"reward {name!r} option {key}={value}: expected a finite number")
    if kind in (bool, int, float) and value is not None:
        fits = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not fits:
            raise RewardSetupError(f"reward {name!r} option {key}={value!r}: expected a {kind.__name__} "
                                   f"(default {default!r})")
    if key == "batch_size" and isinstance(value, int) and value < 1:
        raise RewardSetupError(f"reward {name!r} option batch_size={value}: give a number >= 1")


def reward_accepts(name: str, option: str) -> bool:
    """Whether reward `name` takes keyword `option` (e.g. "device", so a caller can place it per process)."""
    _load_builtin()
    return name in _REGISTRY and option in inspect.signature(_REGISTRY[name]).parameters
