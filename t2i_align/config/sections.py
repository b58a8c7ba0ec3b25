"""The config sections: one dataclass per concern, documented by attribute docstrings, checked in `__post_init__`.

Adding a section = a dataclass here (a method's: in methods.py) plus a field of `Config`; `loader.py` reads YAML
and overrides into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message says which key, where it was set and what was expected.
    A user error (one line `error: ...`, exit 2 at the command line); still a ValueError for older callers."""


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


_YAML_BOOL_WORDS = {"false": ("off", "no"), "true": ("on", "yes")}


def _check_choice(obj: Any, name: str, choices: Tuple[str, ...]) -> None:
    value = getattr(obj, name)
    truth = next((t for t, words in _YAML_BOOL_WORDS.items() if str(value).lower() in (t, *words)), None)
    if truth is not None and value not in choices:
        # YAML 1.1 reads a bare off / no / on / yes in a file as a boolean (a str field then holds "False"), the
        # command line passes text as typed: either way the choice among that truth value's words
        value = next((w for w in _YAML_BOOL_WORDS[truth] if w in choices), value)
        setattr(obj, name, value)
    _check(obj, name, value in choices, "one of " + ", ".join(choices))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
"""diffusers' schedule names (`diffusers.optimization.SchedulerType`; tests/test_config.py checks they agree) but
piecewise_constant, which needs step rules no setting gives; here so that train.lr_scheduler is checked at config
load, before the model and data, without importing torch."""


@dataclass
class TextEncodingConfig:
    kind: str = "clip77"
    """How prompts become UNet conditioning, everywhere text is encoded (training, cache, the empty prompt,
    sampling): "clip77" (the family's own encoder, truncated at 77 tokens) or "segments" (LongAlign, Liu et al.
    2024: each sentence encoded alone, concatenated; see t2i_align/conditioning/segments.py)."""
    token_budget: int = 240
    """"segments" only: the concatenated sequence is cut or padded to this many tokens (LongAlign: 240)."""

    def __post_init__(self) -> None:
        _check_choice(self, "kind", ("clip77", "segments"))
        _check(self, "token_budget", self.token_budget >= 1, "an integer >= 1")


ATTENTION_CHOICES = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "xformers")


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
    cast_base_unet: bool = False
    """With adapters (LoRA, PPD's user branch): the UNet's frozen base weights in weight_dtype too, as diffusers'
    LoRA scripts keep them (half the memory of fp32; the adapters stay fp32, autocast makes them meet). Off: the
    base stays fp32 and autocast casts its weights at each forward. Not under FSDP; speed unmeasured (issue 14)."""
    attention: str = "sdpa"
    """UNet attention: "sdpa" (PyTorch scaled_dot_product_attention picks its kernel, default), "sdpa-flash",
    "sdpa-efficient", "sdpa-cudnn" or "sdpa-math" (that SDPA kernel only, an error where it cannot run), or
    "xformers" (the [xformers] extra, GPU only)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the trained UNet."""
    channels_last: bool = False
    """Use channels_last memory format for the UNet (faster convolutions on recent GPUs)."""
    text_encoding: TextEncodingConfig = field(default_factory=TextEncodingConfig)
    """Text encoding choice (model.text_encoding.kind=clip77|segments, model.text_encoding.token_budget); a model
    tuned with one must be sampled with it (recorded next to the exported weights)."""

    def __post_init__(self) -> None:
        _check(self, "pretrained", bool(self.pretrained), 'a diffusers folder, "toy" or a hub id')
        _check_choice(self, "family", ("auto", "sd15", "sdxl"))
        _check_choice(self, "weight_dtype", ("fp32", "fp16", "bf16"))
        _check_choice(self, "attention", ATTENTION_CHOICES)


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
    kind: str = "pairs"
    """What data.path holds: "pairs" (below), "captions" (image-caption parquet: caption + jpg or path columns,
    LongAlign stage 1, t2i_align/data/captions.py) or "prompts" (prompts file / toy:train-long, for objectives
    that generate their images, e.g. reward_backprop)."""
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
    """Horizontal flips: "none", "independent" (each image of a pair, as the official SD1.5 code) or "joint" (the
    pair flipped together and, with crop="random", cropped at the same relative place of each image's slack;
    diffusers' SDXL DPO script resizes jpg_1 to jpg_0's size first, so its crops coincide when sizes differ)."""
    time_ids: str = "fixed"
    """SDXL's micro-conditioning of training images: "fixed" (every image as the pipeline samples, original size
    = target size = resolution, crop (0, 0): the official Diffusion-DPO code; a pair's two images see one
    condition) or "per_image" (each image's size before the resize and its crop, as diffusers' SDXL
    text-to-image script; a pair's images then condition differently, which DPO's comparison does not expect).
    Image-caption data (SFT, LongAlign stage 1 on SDXL) take it too, where per_image is diffusers' choice."""
    prompt_dropout: float = 0.0
    """Probability of replacing a caption by "" (official Diffusion-DPO: 0.2), for classifier-free guidance. The
    "" is encoded, as the official code and diffusers' SDXL scripts do; SDXL's pipelines guide against zero
    embeddings instead (force_zeros_for_empty_prompt), so on SDXL this trains an unconditional branch that
    sampling does not query."""
    image_root: Optional[str] = None
    """data.kind=captions with a `path` column: the folder the image paths are relative to, which they must stay
    inside (default: each parquet file's own folder); for metadata kept apart from its images."""
    max_pairs: int = 0
    """Use only the first N usable pairs (image-caption rows, prompts with data.kind=prompts; 0: all)."""
    both_models_contain: str = ""
    """Keep only pairs whose two generators (columns model_0 and model_1) both contain this text: "dream" is the
    official Diffusion-DPO `--dreamlike_pairs_only` (Pick-a-Pic's Dreamlike Photoreal images, an SD1.5 fine-tune).
    Empty: every pair."""
    cache: bool = False
    """Precompute VAE latents and text embeddings once and reuse them (see t2i_align/data/cache.py)."""
    cache_dir: Optional[str] = None
    """Where caches live (default: <output_dir>/../cache)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shuffle_window: int = 512
    """Uncached pair data streams: row groups in a seeded order, rows shuffled within windows of this many rows
    (at most one window of image bytes in memory; see t2i_align/data/stream.py)."""

    def __post_init__(self) -> None:
        _check_choice(self, "kind", ("pairs", "captions", "prompts"))
        _check_choice(self, "ties", ("drop", "first"))
        _check(self, "resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a multiple of 8, >= 8")
        _check_choice(self, "crop", ("center", "random"))
        _check_choice(self, "flip", ("none", "independent", "joint"))
        _check_choice(self, "time_ids", ("fixed", "per_image"))
        _check(self, "prompt_dropout", 0.0 <= self.prompt_dropout < 1.0, "a number in [0, 1)")
        _check_at_least(self, ("max_pairs", "num_workers"), 0)
        _check_at_least(self, ("shuffle_window",), 1)


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
    """"adamw", "adamw_fused" (the same update in one fused kernel per step: torch.optim.AdamW(fused=True)),
    "adafactor" (the official SDXL recipe) or "adamw8bit" (needs the [8bit] extra)."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay (also the 8-bit AdamW's; Adafactor ignores both betas)."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay."""
    weight_decay: float = 1e-2
    """Weight decay of the trained parameters (decoupled in AdamW; Adafactor takes it too)."""
    adam_epsilon: float = 1e-8
    """AdamW's denominator epsilon."""
    lr_scheduler: str = "constant_with_warmup"
    """A diffusers schedule (LR_SCHEDULES): constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
    polynomial."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to the learning rate (schedules with a warm-up)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping; the norm is still computed for the non-finite guard)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16" (passed to accelerate)."""
    compile: bool = False
    """torch.compile the trained UNet with inductor, through accelerate (the same as `accelerate launch
    --dynamo_backend inductor`, which also works): the first steps are slow while it compiles."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint (checkpoints/step-N) every N optimizer steps and at the last one, from which a larger
    max_steps continues the run (0: never)."""
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
    ddp_timeout: int = 10800
    """Seconds a process waits in a collective before the run is aborted (transformers' `ddp_timeout`). Processes
    wait for the slowest share of a latent cache build (data.cache) and while the main one writes a gallery or
    checkpoint; accelerate's default under NCCL, 600 s, would abort a cache build of a large data set."""

    def __post_init__(self) -> None:
        _check_at_least(self, ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every",
                               "max_nonfinite_steps", "ddp_timeout"), 1)
        _check_at_least(self, ("checkpoint_every", "lr_warmup_steps"), 0)
        _check(self, "learning_rate", 0 < self.learning_rate < float("inf"), "a finite number > 0")
        _check_choice(self, "optimizer", ("adamw", "adamw_fused", "adafactor", "adamw8bit"))
        _check(self, "optimizer", self.optimizer != "adamw8bit" or _installed("bitsandbytes"),
               "adamw8bit with bitsandbytes installed (pip install 't2i-align[8bit]', GPU only), or adamw")
        _check_choice(self, "lr_scheduler", LR_SCHEDULES)
        _check(self, "lr_warmup_steps", self.lr_scheduler != "constant" or not self.lr_warmup_steps,
               "0 with lr_scheduler constant (which has no warm-up; constant_with_warmup has)")
        _check_choice(self, "mixed_precision", ("no", "fp16", "bf16"))
        _check(self, "max_grad_norm", self.max_grad_norm >= 0, "a number >= 0")
        # torch.optim.AdamW refuses these too, but only once the model and the data have loaded
        for name in ("adam_beta1", "adam_beta2"):
            _check(self, name, 0 <= getattr(self, name) < 1, "a number in [0, 1), e.g. 0.9 or 0.999")
        _check(self, "adam_epsilon", 0 < self.adam_epsilon < float("inf"), "a finite number > 0, e.g. 1e-8")
        _check(self, "weight_decay", 0 <= self.weight_decay < float("inf"), "a finite number >= 0 (0: no decay)")


@dataclass
class TrackingConfig:
    wandb: str = "auto"
    """"auto" (WANDB_MODE when it is set; else online with WANDB_API_KEY, offline without; never prompts),
    "online", "offline" or "off"."""
    project: str = "t2i-align"
    """W&B project the run is logged to."""
    run_name: Optional[str] = None
    """W&B run name (None: W&B picks one)."""
    validate_every: int = 0
    """Write a validation gallery every N optimizer steps (0: only at the end)."""
    validation_prompts: List[str] = field(default_factory=list)
    """Fixed gallery prompts (empty: the first captions of the data set)."""
    validation_seeds: int = 2
    """Images per prompt, at fixed seeds, for the policy and the base model alike."""
    validation_reward: Optional[str] = None
    """Reward shown under each gallery image (e.g. toy-judge); None: no score."""
    validation_reward_options: Dict[str, Any] = field(default_factory=dict)
    """Its options, as `raft.reward_options` (`t2i-score --option`): e.g. model_dir=... for pickscore."""
    sample_steps: int = 20
    """Sampling steps of the validation gallery."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale of the validation gallery."""

    def __post_init__(self) -> None:
        if self.wandb == "disabled":  # W&B's own word for off (a bare YAML `off` is taken back by _check_choice)
            self.wandb = "off"
        _check_choice(self, "wandb", ("auto", "online", "offline", "off"))
        _check_at_least(self, ("validate_every",), 0)
        _check_at_least(self, ("validation_seeds", "sample_steps"), 1)
        _check(self, "guidance_scale", self.guidance_scale >= 0, "a number >= 0")


from .methods import ObjectiveConfig, PpdConfig, RaftConfig, SeppoConfig  # noqa: E402  (they import the helpers above)
from .reward_backprop import RewardBackpropConfig  # noqa: E402  (after the helpers it imports from here)


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
    raft: RaftConfig = field(default_factory=RaftConfig)
    """Online, reward-ranked batches (RAFT and online DPO) instead of offline pairs."""
    seppo: SeppoConfig = field(default_factory=SeppoConfig)
    """SePPO's reference pool, flipper and reference sampling (objective.name: seppo)."""
    ppd: PpdConfig = field(default_factory=PpdConfig)
    """PPD's user branch and user table (personalised preference fine-tuning)."""
    reward_backprop: RewardBackpropConfig = field(default_factory=RewardBackpropConfig)
    """Reward fine-tuning through the sampling chain (objective.name: reward_backprop; LongAlign stage 2)."""

    def __post_init__(self) -> None:
        _check(self, "output_dir", bool(self.output_dir), "a non-empty path")
        _check(self, "seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)")
        self._check_precision()
        if self.ppd.enabled and (self.raft.enabled or self.objective.name in ("seppo", "reward_backprop")
                                 or self.data.kind != "pairs"):
            raise FieldError(Config, "ppd.enabled", True, "false with raft.enabled, objective seppo or "
                             "reward_backprop, or data.kind other than pairs: PPD trains on offline pairs with user "
                             "ids (dpo or sft); RAFT, SePPO and reward fine-tuning generate without users")
        if self.ppd.enabled and self.model.attention.startswith("sdpa-"):
            raise FieldError(Config, "model.attention", self.model.attention, "sdpa or xformers with ppd.enabled "
                             "(the user branch replaces the cross-attention processors with diffusers' IP-Adapter "
                             "ones, which do not hold a kernel)")

    @property
    def full_finetune(self) -> bool:
        """Every UNet weight trains (and the reference is a frozen copy): neither LoRA nor PPD's user branch.
        Otherwise only adapters train and "base" is the same UNet with every adapter off."""
        return not self.lora.enabled and not self.ppd.enabled

    def _check_precision(self) -> None:
        """Half-precision frozen weights need mixed precision, as in diffusers' training scripts.

        There `weight_dtype` follows `mixed_precision`: the frozen parts (text encoders, VAE, reference UNet) are
        cast to fp16/bf16 while the trained UNet stays fp32, and autocast makes the two meet. Without autocast
        (`train.mixed_precision: no`) fp16/bf16 prompt embeddings reach the fp32 UNet's first linear layer and the
        first forward fails with a dtype mismatch, so the combination is refused here, before anything loads.
        """
        if self.model.cast_base_unet and (self.full_finetune or self.model.weight_dtype == "fp32"):
            raise FieldError(Config, "model.cast_base_unet", True,
                             "false unless adapters train (lora.enabled or ppd.enabled: a full fine-tune trains "
                             "every UNet weight, in fp32) and model.weight_dtype is fp16 or bf16 (the base's dtype)")
        if self.model.weight_dtype != "fp32" and self.train.mixed_precision == "no":
            dtype = self.model.weight_dtype
            raise FieldError(Config, "model.weight_dtype", dtype,
                             f"fp32 while train.mixed_precision is 'no' (half-precision frozen weights need "
                             f"autocast to meet the fp32 trained UNet): set train.mixed_precision={dtype} to train "
                             f"with {dtype} frozen weights, or model.weight_dtype=fp32")
