"""The `Config` schema as the loader reads it: dotted keys and their declared types, and the check that a YAML or
override layer names only keys that exist (with a suggestion for one that does not) and holds the right containers."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Optional, Union

from .sections import Config, ConfigError


def _fields(cls: type) -> Dict[str, Any]:
    """Field name -> resolved type (annotations are strings because of `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    """A type as a user reads it: "int", "float or null", "list of str", "section"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section with keys " + ", ".join(_fields(tp))
    return getattr(tp, "__name__", str(tp))


def field_type(dotted: str) -> Any:
    """The declared type of a dotted key of `Config` (or of a list item, "tracking.validation_prompts[3]"), or None
    if there is no such key."""
    tp: Any = Config
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        if not dataclasses.is_dataclass(tp) or name not in _fields(tp):
            return None
        tp = _fields(tp)[name]
        if index:
            tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    return tp


def _all_keys(cls: type = Config, prefix: str = "") -> List[str]:
    """Every dotted key of `Config`, sections included."""
    keys = []
    for name, tp in _fields(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


def section_prefix(owner: type, cls: type = Config, prefix: str = "") -> Optional[str]:
    """The dotted prefix of the section whose dataclass is `owner` ("" for `Config`, "lora." for `LoraConfig`)."""
    if cls is owner:
        return prefix
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            found = section_prefix(owner, tp, f"{prefix}{name}.")
            if found is not None:
                return found
    return None


ALIASES = {"gradient_accumulation_steps": "train.grad_accum", "train_batch_size": "train.batch_size",
           "max_train_steps": "train.max_steps", "pretrained_model_name_or_path": "model.pretrained",
           "resume_from_checkpoint": "train.resume", "checkpointing_steps": "train.checkpoint_every",
           "adam_weight_decay": "train.weight_decay", "beta_dpo": "objective.beta",
           "proportion_empty_prompts": "data.prompt_dropout", "dataloader_num_workers": "data.num_workers",
           "dreamlike_pairs_only": "data.both_models_contain", "lr": "train.learning_rate",
           "optim": "train.optimizer", "num_train_epochs": "train.max_steps"}
"""diffusers' and the official Diffusion-DPO scripts' argument names (and common short names) whose setting has
another name here."""
ALIAS_NOTES = {"beta_dpo": " (diffusers' SD1.5 script's beta_dpo is objective.beta with "
                           "objective.beta_convention=diffusers: its 2500 is the official 5000)",
               "dreamlike_pairs_only": " (the official flag is data.both_models_contain=dream)",
               "num_train_epochs": " (runs are counted in optimizer steps, not epochs)"}


def _suggest(key: str, known: Dict[str, Any], prefix: str, leaf: bool = False) -> List[str]:
    """The settings an unknown key may mean: the same name in another section (max_steps: train.max_steps), a
    diffusers script's name, else a close spelling in its own section (a fuzzy match would offer model.revision
    for model.resolution), not a section for a `leaf` (a value, not a mapping: `lr=1e-4` is no misspelt lora)."""
    same_name = [k for k in _all_keys() if k.rpartition(".")[2] == key]
    if same_name:
        return same_name
    if key in ALIASES:
        return [ALIASES[key]]
    names = [k for k in known if not (leaf and dataclasses.is_dataclass(known[k]))]
    return [prefix + k for k in difflib.get_close_matches(key, names, n=1)]


def check_keys(data: Dict[Any, Any], cls: type, prefix: str, where: str) -> None:
    """Unknown keys, and scalars where a section belongs, fail here with the valid keys and a suggestion."""
    known = _fields(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            hint = " or ".join(f"'{k}'" for k in _suggest(str(key), known, prefix, not isinstance(value, dict)))
            section = f"'{prefix[:-1]}'" if prefix else "the top level"
            note = ALIAS_NOTES.get(str(key), "")
            raise ConfigError(f"Unknown key '{dotted}' in {where}.{f' Did you mean {hint}?{note}' if hint else ''} "
                              f"Valid keys of {section}: " + ", ".join(known))
        if dataclasses.is_dataclass(known[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} = {value!r} in {where}: expected a {describe_type(known[key])}")
            check_keys(value, known[key], dotted + ".", where)
        else:
            _check_containers(dotted, value, known[key], where)


_KINDS = {list: ("a list", "[a, b]"), dict: ("a mapping", "{key: value}")}


def _check_containers(dotted: str, value: Any, tp: Any, where: str) -> None:
    """A list where a mapping belongs or the reverse (OmegaConf's merge fails with a TypeError naming no key), and
    a mapping or list inside a list of text (YAML reads an unquoted `a: b` or `{...}` item as a mapping), which
    OmegaConf keeps and the tokenizer fails on."""
    kind = typing.get_origin(tp)
    interpolation = isinstance(value, str) and value.startswith("${")
    if kind is list and value is not None and not isinstance(value, (list, dict)) and not interpolation:
        raise ConfigError(f"{dotted} = {value!r} in {where}: expected {describe_type(tp)}: write one item as a list, "
                          f"{dotted}=[{value}] on the command line, [{value}] or a `- {value}` line in YAML")
    if kind in _KINDS and isinstance(value, (list, dict)) and not isinstance(value, kind):
        raise ConfigError(f"{dotted} = {value!r} in {where}: expected {describe_type(tp)} ({_KINDS[kind][1]}), not "
                          f"{_KINDS[type(value)][0]}")
    if kind is list and typing.get_args(tp)[0] is str and isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)):
                raise ConfigError(f"{dotted}[{i}] = {item!r} in {where} is {_KINDS[type(item)][0]}, expected text: "
                                  'quote items that contain ": " or start with "{" or "["')
