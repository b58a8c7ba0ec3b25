"""Loading configs: defaults <- YAML (with `base:` inheritance) <- `key=value` overrides, with errors that name
the dotted key, where it was set and what was expected; and saving the resolved config atomically."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..files import shown, write_text_atomic
from .keys import check_keys, describe_type, field_type, section_prefix
from .sections import Config, ConfigError, FieldError
from .yaml_text import Dumper, entries, retype

_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _read_yaml(path: Path, chain: Tuple[Path, ...] = ()) -> List[Tuple[str, DictConfig]]:
    """[(file name, contents)] in merge order: the `base:` chain first, then the file itself."""
    if path.is_dir():
        raise ConfigError(f"Config file {path} is a folder: give a YAML file, e.g. configs/toy/dpo.yaml")
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path} (the base of {chain[-1]})" if chain else
                          f"Config file not found: {shown(path)}")
    if path.resolve() in chain:
        raise ConfigError(f"Circular 'base' chain: {' -> '.join(map(str, chain))} -> {path}")
    try:
        layer = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"Invalid YAML in {path}: {exc}") from None
    except UnicodeDecodeError:  # e.g. --config given a weights file
        raise ConfigError(f"{path} is not a UTF-8 YAML file: give a config, e.g. configs/toy/dpo.yaml") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, not a list")
    if not layer:
        warnings.warn(f"config file {path} is empty: it sets nothing (the defaults of "
                      "t2i_align/config/sections.py hold)", stacklevel=2)
    _keep_text_as_typed(path, layer)
    if "compute_environment" in layer and "distributed_type" in layer:
        raise ConfigError(f"{path} is an accelerate config: give it as `accelerate launch --config_file {path} "
                          "train/train.py --config RUN.yaml`, with a run config (e.g. configs/toy/dpo.yaml) here")
    base = layer.pop("base", None)
    if base is None:
        return [(str(path), layer)]
    if not isinstance(base, str):
        raise ConfigError(f"base = {base!r} in {path}: expected a path to another YAML file")
    return _read_yaml(path.parent / Path(base).expanduser(), chain + (path.resolve(),)) + [(str(path), layer)]


def _parse_override(item: str) -> Tuple[str, DictConfig]:
    key, sep, value = item.partition("=")
    if not sep and item.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"{item!r} on the command line is a config file, not a key=value override: pass it as "
                          f"--config {item}")
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise ConfigError(f"Malformed override {item!r} on the command line: expected key=value, e.g. "
                          "train.max_steps=100" + ("; a value with spaces is one shell word when quoted: "
                                                   "tracking.run_name='my run'" if not sep else ""))
    where = f"command line ({item})"
    try:
        text = _text_setting(key)
        if text is None:
            layer = OmegaConf.from_dotlist([item])
            if field_type(key) == List[str]:  # its items as typed, as in a file
                retype(layer, key, yaml.compose(value))
            return where, layer
        node: Any = _text_value(item, value, optional=text == "optional")
        for part in reversed(key.split(".")):
            node = {part: node}
        return where, OmegaConf.create(node)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"Malformed override {item!r} on the command line: {exc}") from None


def _text_setting(key: str) -> Optional[str]:
    """"text" or "optional" (text or null) when `key` holds text, else None."""
    tp = field_type(key)
    args = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    if str not in args or any(a not in (str, type(None)) for a in args):
        return None
    return "optional" if type(None) in args else "text"


def _text_value(item: str, value: str, optional: bool) -> Optional[str]:
    """A text setting's value as typed: not read as YAML, which would turn output_dir=0001 into "1", 1:30 into
    "90" (base 60) and yes into "True". Quoted text is unquoted; null, ~ (and nothing, where null is allowed)
    mean null."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return str(yaml.safe_load(value))
    if value in ("null", "Null", "NULL", "~") or (optional and not value):
        return None
    if optional and value in ("None", "none"):  # where null is allowed: meant as null, would become the text
        raise ConfigError(f"{item} on the command line: write null for no value (or quote it, '{value}', for the "
                          "text)")
    return value


def _merge_error(exc: OmegaConfBaseException, where: str) -> ConfigError:
    reason = str(getattr(exc, "msg", exc)).splitlines()[0]
    key = getattr(exc, "full_key", None)
    if not key:
        return ConfigError(f"Invalid value in {where}: {reason}")
    expected = describe_type(field_type(key))
    return ConfigError(f"{key} = {getattr(exc, 'value', None)!r} in {where}: expected {expected} ({reason})")


def _where_set(key: str, layers: List[Tuple[str, DictConfig]]) -> str:
    """The last file or override that set `key` (for messages about values that fail only once merged)."""
    for where, layer in reversed(layers):
        node: Any = OmegaConf.to_container(layer, resolve=False)
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            return where
    return "the defaults"


def _empty_mappings(data: Dict[Any, Any], prefix: str = "") -> List[str]:
    """Mapping-typed keys set to {} in one layer: `raft.reward_options={}` empties what a base file set there
    (an empty section such as `lora: {}` changes nothing, as before)."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys += _empty_mappings(value, dotted + ".")
        elif value == {} and typing.get_origin(field_type(dotted)) is dict:
            keys.append(dotted)
    return keys


def load_config(path: Union[str, os.PathLike, None], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` (and its `base:` chain; None = defaults only) <- `key=value` overrides."""
    layers = _read_yaml(Path(path).expanduser()) if path is not None else []
    files = len(layers)
    layers += [_parse_override(item) for item in overrides]
    _warn_repeated(overrides)
    merged = OmegaConf.structured(Config)
    for where, layer in layers:
        data = OmegaConf.to_container(layer, resolve=False)
        check_keys(data, Config, "", where)
        try:
            merged = OmegaConf.merge(merged, layer)
            for key in _empty_mappings(data):
                OmegaConf.update(merged, key, {}, merge=False)  # a merge would keep the old keys
        except OmegaConfBaseException as exc:
            raise _merge_error(exc, where) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except FieldError as exc:
        key = (section_prefix(exc.owner) or "") + exc.name
        raise ConfigError(f"{key} = {exc.value!r} in {_where_set(key, layers)}: expected {exc.expected}") from None
    except OmegaConfBaseException as exc:  # e.g. an unresolvable ${...} interpolation
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key} in {_where_set(key, layers)}: {str(exc.msg).splitlines()[0]}") from None
    _expand_home(cfg)
    _check_finite(cfg)
    _check_switched_on(cfg, layers[files:])
    _warn_fixed_reference(cfg)
    return cfg


def _warn_fixed_reference(cfg: Config) -> None:
    """SePPO settings under which the initial model is the reference at every step, as with reference=initial;
    LoRA dropout, which tilts the flipper (the policy's error is read with dropout on, the reference's without)."""
    sc = cfg.seppo
    if cfg.objective.name == "seppo" and sc.flip != "off" and cfg.lora.enabled and cfg.lora.dropout > 0:
        warnings.warn(f"lora.dropout={cfg.lora.dropout} with SePPO's flipper: the policy's error on the preferred "
                      "images is read with dropout on and the reference's without, which tilts s towards -1 (the "
                      "official code has no dropout); lora.dropout=0 keeps the flipper fair", stacklevel=3)
    if cfg.objective.name != "seppo" or sc.reference == "initial":
        return
    if sc.pool_size == 1 or sc.snapshot_every >= cfg.train.max_steps:
        why = ("seppo.pool_size is 1" if sc.pool_size == 1 else f"seppo.snapshot_every ({sc.snapshot_every}) >= "
               f"train.max_steps ({cfg.train.max_steps})")
        warnings.warn(f"{why}: SePPO's reference is the initial model at every step (no later snapshot is ever "
                      "drawn); lower snapshot_every or raise pool_size for a reference that changes, or set "
                      "seppo.reference=initial to mean it", stacklevel=3)


def _warn_repeated(overrides: Sequence[str]) -> None:
    """A key set twice on the command line with two values: the last counts, which a long command hides."""
    first: dict = {}
    for item in overrides:
        key = item.partition("=")[0]
        if first.setdefault(key, item) != item:
            warnings.warn(f"{key} is set twice on the command line ({first[key]}, then {item}): the last one counts",
                          stacklevel=3)
            first[key] = item


def _leaves(data: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, value) of every setting in a layer, a mapping setting (reward_options) as one."""
    if not isinstance(data, dict) or (prefix and typing.get_origin(field_type(prefix[:-1])) is dict):
        return [(prefix[:-1], data)]
    return [leaf for key, value in data.items() for leaf in _leaves(value, f"{prefix}{key}.")]


def _keep_text_as_typed(path: Path, layer: DictConfig) -> None:
    """Text settings of a YAML file as typed (`yaml_text.as_typed`); a bare `None`, the text "None" in YAML,
    refused where null is allowed (raft.negative_prompt, cache_dir: a negative prompt "None", a cache folder named
    None). Quoted, it is the text (as `save_config` writes it)."""
    data = OmegaConf.to_container(layer, resolve=False)
    try:
        document = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:  # OmegaConf's loader takes a tab after "key:" that PyYAML's refuses
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        tabs = " (a tab: separate and indent with spaces)" if "'\\t'" in problem else ""
        raise ConfigError(f"Invalid YAML in {path}{where}: {problem}{tabs}") from None
    for key, node in entries(document):
        kind = _text_setting(key) or ("list" if field_type(key) == List[str] else None)
        if kind is None:
            continue
        if kind == "optional" and isinstance(node, yaml.ScalarNode) and node.style is None and \
                node.value in ("None", "none"):
            raise ConfigError(f"{key}: None in {path} is the text 'None' in YAML: write null for no value (or "
                              "quote it for the text)")
        retype(layer, key, node, data)


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every number setting finite: `lora.alpha=inf`, `raft.min_gap=nan` were taken as they are."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} = {value}: expected a finite number")


PATH_KEYS = ("output_dir", "data.path", "data.cache_dir", "data.image_root", "train.resume", "raft.prompts",
             "ppd.table")
"""Settings that name a file or folder, where a leading ~ means the home folder as in a shell (or a run made a
folder named ~). model.pretrained and model.vae are expanded where they load, which tells paths from hub ids."""


def _expand_home(cfg: Config) -> None:
    """`~` expanded; a path with spaces at its ends refused (`output_dir= /x` passes " /x": a folder " " here)."""
    for key in (*PATH_KEYS, "model.pretrained", "model.vae"):
        section, _, name = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, name)
        if value and value != value.strip():
            example = f" (as `{key}= {value.strip()}` passes it)" if value[0].isspace() else ""
            raise ConfigError(f"{key} = {value!r} begins or ends with a space{example}: write {key}={value.strip()}")
        if key in PATH_KEYS and value:
            setattr(owner, name, os.path.expanduser(getattr(owner, name)))


SWITCHED_SECTIONS = ("lora", "raft", "ppd")
"""Sections that do nothing unless their `enabled` is true."""
OBJECTIVE_SECTIONS = ("seppo", "reward_backprop")
"""Sections that only the objective of their name reads."""
DPO_KEYS = ("objective.beta", "objective.beta_convention", "objective.loss_type")
"""Read by the objectives with a DPO loss (dpo, seppo) only."""
PAIR_DATA_KEYS = ("data.path", "data.ties", "data.max_pairs", "data.both_models_contain", "data.cache",
                  "data.cache_dir")
"""Read from a data set, which RAFT (its own samples) has none of."""
RAFT_IGNORED_KEYS = PAIR_DATA_KEYS + ("data.kind", "data.resolution", "data.crop", "data.flip", "data.time_ids",
                                      "data.num_workers", "data.image_root")
"""Neither are these: RAFT's samples are generated at raft.resolution, uncropped, and served from memory."""
KIND_KEYS = {"data.ties": ("pairs",), "data.shuffle_window": ("pairs",), "data.cache": ("pairs", "captions"),
             "data.cache_dir": ("pairs", "captions"), "data.image_root": ("captions",)}
"""Data settings read only for these data.kind values (prompts are read as text, captions served in order)."""


def _check_switched_on(cfg: Config, overrides: Sequence[Tuple[str, DictConfig]]) -> None:
    """A command-line override that nothing reads would be ignored without a word: refused in a section that is
    off (`lora.rank=4` without `lora.enabled=true` trains the whole UNet; `seppo.pool_size=3` with DPO), a warning
    for DPO's loss settings without a DPO loss and pair-data settings under RAFT (a sweep may pass them to every
    method). Config files may keep such settings."""
    for _, layer in overrides:
        for key, value in _leaves(OmegaConf.to_container(layer, resolve=False)):
            if value in (None, "", {}, []):  # clearing a setting is harmless
                continue
            section, _, rest = key.partition(".")
            why, fix, refused = _no_effect(cfg, key, section, rest)
            if refused:
                raise ConfigError(f"{key} is set on the command line, but {why}, so it would have no effect: "
                                  f"{fix}, or drop it")
            if why:
                warnings.warn(f"{key} is set on the command line, but {why}: it has no effect", stacklevel=2)


def _no_effect(cfg: Config, key: str, section: str, rest: str) -> Tuple[str, str, bool]:
    """(why `key` is read by nothing in `cfg`, what would make it read, whether that is refused), or empty."""
    if section in SWITCHED_SECTIONS and rest != "enabled" and not getattr(cfg, section).enabled:
        return f"{section}.enabled is false", f"add {section}.enabled=true", True
    if section in OBJECTIVE_SECTIONS and cfg.objective.name != section:
        return f"objective.name is {cfg.objective.name!r}", f"add objective.name={section}", True
    if key == "tracking.validation_reward_options" and not cfg.tracking.validation_reward:
        return "tracking.validation_reward is not set", "set tracking.validation_reward", True
    if key in DPO_KEYS and cfg.objective.name not in ("dpo", "seppo"):
        return f"objective.name is {cfg.objective.name!r} (no DPO loss)", "", False
    if key in RAFT_IGNORED_KEYS and cfg.raft.enabled:
        size = " (their size is raft.resolution)" if key == "data.resolution" else ""
        return f"raft.enabled is true (RAFT trains on its own samples{size})", "", False
    if key in KIND_KEYS and cfg.data.kind not in KIND_KEYS[key]:
        return f"data.kind is {cfg.data.kind!r}", "", False
    if key == "seppo.snapshots_in_memory" and not cfg.full_finetune:
        return "only a full fine-tune's snapshots are files (LoRA snapshots are always in memory)", "", False
    if key == "train.offload_reference" and not cfg.full_finetune:
        return "only a full fine-tune keeps a frozen reference copy (with adapters it is the base, adapters off)", \
            "", False
    if key == "data.shuffle_window" and cfg.data.cache:
        return "data.cache is true (cached data is shuffled whole)", "", False
    if key in SNAPSHOT_KEYS and cfg.seppo.reference == "initial":
        return "seppo.reference is 'initial' (no snapshot is taken)", "", False
    if key == "seppo.anchor_draws" and cfg.seppo.flip == "off":
        return "seppo.flip is 'off' (the flipper's errors are not read)", "", False
    return "", "", False


SNAPSHOT_KEYS = ("seppo.snapshot_every", "seppo.pool_size", "seppo.snapshots_in_memory")
"""SePPO's pool settings, read by nothing when the reference is the initial model."""


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict of the resolved config (what `save_config` writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Union[str, os.PathLike], overrides: Optional[Dict[str, Any]] = None) -> None:
    """Write `cfg` as YAML that `load_config` reads back; atomic (temp file in the same folder, then rename).
    `overrides`: {"section.key": value} written instead of cfg's (a resume's settings that were not applied)."""
    write_text_atomic(Path(path), dump_config(cfg, overrides))


def dump_config(cfg: Config, overrides: Optional[Dict[str, Any]] = None) -> str:
    """`cfg` as the YAML `save_config` writes (and `--dry-run` prints)."""
    data = config_to_dict(cfg)
    for name, value in (overrides or {}).items():
        *sections, key = name.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[key] = value
    return yaml.dump(data, Dumper=Dumper, sort_keys=False)
