"""Typed configuration: one dataclass per concern, loaded from YAML with dotted overrides.

Sections are dataclasses documented by their attribute docstrings and checked in `__post_init__`. `load_config`
merges defaults <- YAML (a top-level `base: other.yaml` is merged first) <- `key=value` overrides with OmegaConf
structured configs, which convert and type-check values; every mistake is a `ConfigError` naming the dotted key,
where it was set and what was expected. Adding a section = a dataclass plus a field of `Config`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key, where it was set and what was expected."""


class FieldError(ConfigError):
    """Raised by a section's `__post_init__`; `load_config` turns it into a message with the full dotted key."""

    def __init__(self, owner: type, name: str, value: Any, expected: str):
        super().__init__(f"{owner.__name__}.{name} = {value!r}: expected {expected}")
        self.owner, self.name, self.value, self.expected = owner, name, value, expected


def _check(obj: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise FieldError(type(obj), name, getattr(obj, name), expected)


def _check_at_least(obj: Any, names: Sequence[str], low: int) -> None:
    for name in names:
        _check(obj, name, getattr(obj, name) >= low, f"an integer >= {low}")


def _check_choice(obj: Any, name: str, choices: Tuple[str, ...]) -> None:
    _check(obj, name, getattr(obj, name) in choices, "one of " + ", ".join(choices))


@dataclass
class ModelConfig:
    pretrained: str = "toy"
    """Local diffusers folder (with model_index.json), "toy" for the shipped toy pipeline, or a hub id
    (only when a network exists)."""
    family: str = "auto"
    """Model family: "auto" (read model_index.json), "sd15" or "sdxl"."""
    revision: Optional[str] = None
    """Hub revision; ignored for local folders."""
    variant: Optional[str] = None
    """Weight variant to load, e.g. "fp16" for *.fp16.safetensors files."""
    vae: Optional[str] = None
    """Optional separate VAE folder (e.g. an fp16-safe SDXL VAE)."""
    weight_dtype: str = "fp32"
    """dtype of frozen weights (VAE, text encoders, reference UNet): "fp32", "fp16" or "bf16"."""
    attention: str = "sdpa"
    """Attention backend: "sdpa" (PyTorch scaled_dot_product_attention, default) or "xformers"."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the trained UNet."""
    channels_last: bool = False
    """Use channels_last memory format for the UNet (faster convolutions on recent GPUs)."""

    def __post_init__(self) -> None:
        _check(self, "pretrained", bool(self.pretrained), 'a diffusers folder, "toy" or a hub id')
        _check_choice(self, "family", ("auto", "sd15", "sdxl"))
        _check_choice(self, "weight_dtype", ("fp32", "fp16", "bf16"))
        _check_choice(self, "attention", ("sdpa", "xformers"))


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters on the UNet instead of all its weights."""
    rank: int = 8
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha; scaling is alpha / rank. None means alpha = rank."""
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get adapters (attention projections by default, as in the diffusers scripts)."""
    init: str = "gaussian"
    """peft init_lora_weights: "gaussian" or "default" (both leave B = 0, so the model is unchanged at init)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""

    def __post_init__(self) -> None:
        _check(self, "rank", self.rank >= 1, "an integer >= 1")
        _check(self, "alpha", self.alpha is None or self.alpha > 0, "null or a number > 0")
        _check(self, "target_modules", len(self.target_modules) > 0, "a non-empty list of module names")
        _check_choice(self, "init", ("gaussian", "default"))
        _check(self, "dropout", 0.0 <= self.dropout < 1.0, "a number in [0, 1)")


@dataclass
class DataConfig:
    path: str = ""
    """Pick-a-Pic-v2-format pairs: a local parquet file or a folder of parquet files (columns caption, jpg_0,
    jpg_1, label_0 ...). `python -m t2i_align.toy pairs` writes such a file for the toy world."""
    ties: str = "drop"
    """Pairs with label_0 = 0.5: "drop" (as the official Diffusion-DPO code) or "first" (jpg_0 wins, as the
    diffusers example does silently)."""
    resolution: int = 512
    """Images are resized (shorter side) and cropped to resolution x resolution."""
    crop: str = "center"
    """"center" or "random" crop after the resize."""
    flip: str = "none"
    """Horizontal flips: "none", "independent" (each image of a pair, as the official SD1.5 code) or "joint"."""
    prompt_dropout: float = 0.0
    """Probability of replacing a caption by "" (official Diffusion-DPO: 0.2), for classifier-free guidance."""
    max_pairs: int = 0
    """Use only the first N usable pairs (0: all)."""
    cache: bool = False
    """Precompute VAE latents and text embeddings once and reuse them (see t2i_align/data/cache.py)."""
    cache_dir: Optional[str] = None
    """Where caches live (default: <output_dir>/../cache)."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _check_choice(self, "ties", ("drop", "first"))
        _check(self, "resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a multiple of 8, >= 8")
        _check_choice(self, "crop", ("center", "random"))
        _check_choice(self, "flip", ("none", "independent", "joint"))
        _check(self, "prompt_dropout", 0.0 <= self.prompt_dropout < 1.0, "a number in [0, 1)")
        _check_at_least(self, ("max_pairs", "num_workers"), 0)


@dataclass
class ObjectiveConfig:
    name: str = "dpo"
    """Training objective, a module in t2i_align/objectives/: "dpo" or "sft"."""
    beta: float = 5000.0
    """DPO β (official SD1.5/SDXL launchers: 5000; the paper's SD1.5 results: 2000). Tied to the per-sample
    MSE being a mean over latent elements."""
    beta_convention: str = "official"
    """"official": logit = -½·β·(Δθ - Δref) (Salesforce code); "diffusers": logit = -β·(Δθ - Δref) (the diffusers
    port, whose β = 2500 equals official β = 5000)."""
    loss_type: str = "sigmoid"
    """"sigmoid" (DPO, -log σ(logit)), "hinge" (SLiC-style, relu(1 - logit)) or "ipo" (Azar et al. 2023:
    (margin - 1/(2s))², margin = Δref - Δθ, s = ½β official / β diffusers)."""

    def __post_init__(self) -> None:
        _check(self, "name", bool(self.name), "an objective name, e.g. dpo or sft")
        _check(self, "beta", self.beta > 0, "a number > 0")
        _check_choice(self, "beta_convention", ("official", "diffusers"))
        _check_choice(self, "loss_type", ("sigmoid", "hinge", "ipo"))


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 1
    """Pairs (or images) per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (official DPO: 128 on 16 GPUs with batch 1 = 2048 pairs)."""
    learning_rate: float = 1e-5
    """Peak learning rate (before `scale_lr`)."""
    scale_lr: bool = False
    """Multiply the LR by batch_size × grad_accum × processes, as the official launchers (1e-8 → 2.048e-5)."""
    optimizer: str = "adamw"
    """"adamw", "adafactor" (the official SDXL recipe) or "adamw8bit" (needs the [8bit] extra)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"
    """Any diffusers schedule name: constant, constant_with_warmup, linear, cosine, ..."""
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping; the norm is still computed for the non-finite guard)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16" (passed to accelerate)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint (checkpoints/step-N) every N optimizer steps (0: never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: Optional[str] = None
    """"latest" (newest complete checkpoint in output_dir) or a checkpoint folder."""
    log_every: int = 10
    """Write metrics every N optimizer steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient."""
    offload_reference: bool = False
    """Full fine-tuning: keep the frozen reference UNet on the CPU between uses (saves GPU memory, slower)."""

    def __post_init__(self) -> None:
        _check_at_least(self, ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every",
                               "max_nonfinite_steps"), 1)
        _check_at_least(self, ("checkpoint_every", "lr_warmup_steps"), 0)
        _check(self, "learning_rate", self.learning_rate > 0, "a number > 0")
        _check_choice(self, "optimizer", ("adamw", "adafactor", "adamw8bit"))
        _check_choice(self, "mixed_precision", ("no", "fp16", "bf16"))
        _check(self, "max_grad_norm", self.max_grad_norm >= 0, "a number >= 0")


@dataclass
class TrackingConfig:
    wandb: str = "auto"
    """"auto" (online with WANDB_API_KEY, else offline; never prompts), "online", "offline" or "off"."""
    project: str = "t2i-align"
    run_name: Optional[str] = None
    validate_every: int = 0
    """Write a validation gallery every N optimizer steps (0: only at the end)."""
    validation_prompts: List[str] = field(default_factory=list)
    """Fixed gallery prompts (empty: the first captions of the data set)."""
    validation_seeds: int = 2
    """Images per prompt, at fixed seeds, for the policy and the base model alike."""
    validation_reward: Optional[str] = None
    """Reward shown under each gallery image (e.g. toy-judge); None: no score."""
    sample_steps: int = 20
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        if self.wandb in ("False", "false", "disabled"):  # YAML reads a bare `off` as false
            self.wandb = "off"
        _check_choice(self, "wandb", ("auto", "online", "offline", "off"))
        _check_at_least(self, ("validate_every",), 0)
        _check_at_least(self, ("validation_seeds", "sample_steps"), 1)


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, checkpoints/, final/ and gallery/ are written here."""
    seed: int = 0
    """Seed for everything random (initialisation, noise, timesteps, data order); passed explicitly."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which pretrained pipeline to load and how (dtype, attention backend, memory options)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the UNet; `enabled: false` means full fine-tuning."""
    data: DataConfig = field(default_factory=DataConfig)
    """Offline pair data (Pick-a-Pic format) and its transforms and cache."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The method: which loss, and its hyper-parameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, precision, checkpoints and resume."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """metrics.jsonl, W&B and validation galleries."""

    def __post_init__(self) -> None:
        _check(self, "output_dir", bool(self.output_dir), "a non-empty path")
        _check(self, "seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)")


def _fields(cls: type) -> Dict[str, Any]:
    """Field name -> resolved type (annotations are strings because of `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe_type(tp: Any) -> str:
    """A type as a user reads it: "int", "float or null", "list of str", "section"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_describe_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section with keys " + ", ".join(_fields(tp))
    return getattr(tp, "__name__", str(tp))


def _field_type(dotted: str) -> Any:
    """The declared type of a dotted key of `Config`, or None if there is no such key."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in _fields(tp):
            return None
        tp = _fields(tp)[part]
    return tp


def _section_prefix(owner: type, cls: type = Config, prefix: str = "") -> Optional[str]:
    """The dotted prefix of the section whose dataclass is `owner` ("" for `Config`, "lora." for `LoraConfig`)."""
    if cls is owner:
        return prefix
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            found = _section_prefix(owner, tp, f"{prefix}{name}.")
            if found is not None:
                return found
    return None


def _check_keys(data: Dict[Any, Any], cls: type, prefix: str, where: str) -> None:
    """Unknown keys, and scalars where a section belongs, fail here with the valid keys and a suggestion."""
    known = _fields(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"Unknown key '{dotted}' in {where}.{hint} Valid keys of {section}: "
                              + ", ".join(known))
        if dataclasses.is_dataclass(known[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} = {value!r} in {where}: expected a {_describe_type(known[key])}")
            _check_keys(value, known[key], dotted + ".", where)


def _read_yaml(path: Path, chain: Tuple[Path, ...] = ()) -> List[Tuple[str, DictConfig]]:
    """[(file name, contents)] in merge order: the `base:` chain first, then the file itself."""
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}" + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"Circular 'base' chain: {' -> '.join(map(str, chain))} -> {path}")
    try:
        layer = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"Invalid YAML in {path}: {exc}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, not a list")
    base = layer.pop("base", None)
    if base is None:
        return [(str(path), layer)]
    if not isinstance(base, str):
        raise ConfigError(f"base = {base!r} in {path}: expected a path to another YAML file")
    return _read_yaml(path.parent / base, chain + (path.resolve(),)) + [(str(path), layer)]


def _parse_override(item: str) -> Tuple[str, DictConfig]:
    key, sep, _ = item.partition("=")
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise ConfigError(f"Malformed override {item!r} on the command line: expected key=value, e.g. lora.rank=4")
    try:
        return f"command line ({item})", OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"Malformed override {item!r} on the command line: {exc}") from None


def _merge_error(exc: OmegaConfBaseException, where: str) -> ConfigError:
    reason = str(getattr(exc, "msg", exc)).splitlines()[0]
    key = getattr(exc, "full_key", None)
    if not key:
        return ConfigError(f"Invalid value in {where}: {reason}")
    expected = _describe_type(_field_type(key))
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


def load_config(path: Union[str, os.PathLike, None], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` (and its `base:` chain; None = defaults only) <- `key=value` overrides."""
    layers = _read_yaml(Path(path)) if path is not None else []
    layers += [_parse_override(item) for item in overrides]
    merged = OmegaConf.structured(Config)
    for where, layer in layers:
        _check_keys(OmegaConf.to_container(layer, resolve=False), Config, "", where)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _merge_error(exc, where) from None
    try:
        return OmegaConf.to_object(merged)
    except FieldError as exc:
        key = (_section_prefix(exc.owner) or "") + exc.name
        raise ConfigError(f"{key} = {exc.value!r} in {_where_set(key, layers)}: expected {exc.expected}") from None
    except OmegaConfBaseException as exc:  # e.g. an unresolvable ${...} interpolation
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key} in {_where_set(key, layers)}: {str(exc.msg).splitlines()[0]}") from None


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict of the resolved config (what `save_config` writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write `cfg` as YAML that `load_config` reads back; atomic (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
