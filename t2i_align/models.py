"""Load SD1.5 / SDXL / toy components from a diffusers folder; attention backend; the VAE's precision.
Adapters (LoRA, the frozen reference, adapters off) are in `t2i_align.adapters`.

Family differences (which tokenizers and encoders, how prompts are encoded, what extra UNet inputs exist,
which pipeline samples) live in one `FamilySpec` per family, in the spirit of finetrainers' ModelSpecification,
so that the loop and the objectives never ask "is this SDXL?".
"""
from __future__ import annotations

import copy
import importlib.util
import json
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

import torch

from t2i_align.conditioning import segments, text
from t2i_align.config import ModelConfig
from t2i_align.config.sections import ATTENTION_CHOICES, TextEncodingConfig
from t2i_align.diffusion import latent_scheduler
from t2i_align.errors import one_line
from t2i_align.model_folders import (ModelLoadError, check_tuned_folder, check_vae_scale,  # noqa: F401
                                     local_model_folder, part_class, read_index, resolve_pretrained)
from t2i_align.pipeline_checks import check_listed_parts, check_tokenizer
from t2i_align.weight_files import weights_variant


@dataclass(frozen=True)
class FamilySpec:
    """Everything that differs between model families, in one place."""

    name: str
    pipeline_classes: Tuple[str, ...]
    """`_class_name` values in model_index.json that mean this family."""
    text_components: Tuple[Tuple[str, str], ...]
    """(tokenizer, text encoder) subfolder pairs, in the order the family concatenates them."""
    sampling_pipeline: str
    """diffusers pipeline class used for sampling."""
    encode_prompts: Callable[..., text.PromptEmbeds]
    """(components, prompts) -> PromptEmbeds: the family's own 77-token encoding ("clip77")."""
    encode_segments: Callable[..., text.PromptEmbeds]
    """(components, prompts) -> PromptEmbeds: LongAlign's segment encoding ("segments")."""
    added_cond_kwargs: Callable[..., dict]
    """(PromptEmbeds, time_ids or None) -> the UNet's `added_cond_kwargs`."""
    vae_fp32: bool
    """Keep the VAE in fp32 whatever weight_dtype says (the SDXL VAE overflows to NaN in fp16)."""
    default_resolution: int
    uses_time_ids: bool = False
    """SDXL micro-conditioning: the UNet takes (original size, crop top-left, target size) per image."""
    pipeline_extra_kwargs: Tuple[Tuple[str, Any], ...] = ()
    """Extra constructor arguments of the sampling pipeline (SD1.5: no safety checker)."""


SD15 = FamilySpec(
    name="sd15",
    pipeline_classes=("StableDiffusionPipeline",),
    text_components=(("tokenizer", "text_encoder"),),
    sampling_pipeline="StableDiffusionPipeline",
    encode_prompts=text.encode_clip_last_hidden,
    encode_segments=segments.encode_segments_last_hidden,
    added_cond_kwargs=text.no_added_cond,
    vae_fp32=False,
    default_resolution=512,
    pipeline_extra_kwargs=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
)
SDXL = FamilySpec(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    text_components=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    sampling_pipeline="StableDiffusionXLPipeline",
    encode_prompts=text.encode_clip_penultimate_pooled,
    encode_segments=segments.encode_segments_penultimate_pooled,
    added_cond_kwargs=text.text_time_added_cond,
    vae_fp32=True,
    default_resolution=1024,
    uses_time_ids=True,
)
FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({spec.name: spec for spec in (SD15, SDXL)})

_DTYPES = MappingProxyType({
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
})
def torch_dtype(name: str) -> torch.dtype:
    """"fp32" / "fp16" / "bf16" (or the torch spelling) -> torch.dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16") from None


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers' from_pretrained dtype argument: `dtype` where diffusers has it (`torch_dtype` warns that it is
    deprecated there), else `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


class UnsupportedPipeline(ModelLoadError):
    """A pipeline class known not to be trainable here (model.family cannot override it)."""


def detect_family(path: Union[str, Path]) -> FamilySpec:
    """The family whose pipeline class is model_index.json's `_class_name`."""
    index = read_index(Path(path))
    class_name = index.get("_class_name")
    for spec in FAMILIES.values():
        if class_name in spec.pipeline_classes:
            return spec
    # the refiner (an SDXL base saved from an img2img pipeline has text_encoder and no aesthetic score)
    if class_name == "StableDiffusionXLImg2ImgPipeline" and (index.get("requires_aesthetics_score")
                                                             or (index.get("text_encoder") or [None])[0] is None):
        raise UnsupportedPipeline(f"{path} is an SDXL refiner / img2img pipeline: not supported (the official "
                                  "Diffusion-DPO code's refiner branch trains timesteps t % 200 with 5 time ids, the "
                                  "last an aesthetic score); give the SDXL base model's folder")
    supported = ", ".join(f"{c} ({s.name})" for s in FAMILIES.values() for c in s.pipeline_classes)
    raise ModelLoadError(
        f"{path}/model_index.json names pipeline class {class_name!r}, which is not supported. Supported: "
        f"{supported} (text-to-image only: not inpainting or instruct-pix2pix). If it is one of these families "
        "under another name, set model.family explicitly."
    )


@dataclass
class Components:
    """The loaded parts of one model. Frozen parts (VAE, text encoders) are in eval mode without gradients."""

    spec: FamilySpec
    tokenizers: List[Any]
    text_encoders: List[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    """DDPMScheduler built from the folder's scheduler config (training noise schedule and prediction type)."""
    path: Path
    weight_dtype: torch.dtype
    truncation: text.TruncationStats = field(default_factory=text.TruncationStats)
    sampling_truncation: text.TruncationStats = field(default_factory=lambda: text.TruncationStats(totals=""))
    """What the pipelines built from these components count (galleries, RAFT's rounds): warned once a run."""
    text_encoding: TextEncodingConfig = field(default_factory=TextEncodingConfig)
    """How `encode_prompts` turns prompts into conditioning ("clip77" or "segments"), wherever text is encoded."""
    users: Any = None
    """PPD: the `t2i_align.users.training.UserLookup` giving batches their user tokens (set when ppd.enabled)."""
    time_ids: str = "fixed"
    """SDXL: how training batches' micro-conditioning is computed (data.time_ids: "fixed" or "per_image")."""
    vae_dir: Optional[Path] = None
    """The folder of a `model.vae` override as resolved when it loaded (recorded by a LoRA export)."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD1.5 / SDXL, 2 for the toy VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load_part(path: Path, index: dict, name: str, variant: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """Load component `name` with the class model_index.json names for it, as DiffusionPipeline does.

    diffusers models get `torch_dtype` at load time (casting afterwards with `.to` makes diffusers warn, and
    an fp16 variant must come up as fp32 for the trained UNet); transformers models are cast by the caller.
    """
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise ModelLoadError(f"{path}/model_index.json has no {name!r} component")
    library, class_name = entry
    cls = part_class(path, name, library, class_name)
    from .weight_files import from_pretrained_checked, part_variant

    variant = part_variant(path, name, variant)
    kwargs: dict = {"variant": variant} if variant and name.startswith(("text_encoder", "vae", "unet")) else {}
    if dtype is not None and library == "diffusers":
        kwargs.update(dtype_kwargs(dtype))
    if library == "transformers":
        kwargs["trust_remote_code"] = False
    from safetensors import SafetensorError

    try:
        return from_pretrained_checked(cls, path, name, **kwargs)
    # a file missing or unreadable in the subfolder (a partial copy, a variant it lacks); transformers lets a
    # truncated safetensors file's own error through, naming no file
    except (OSError, json.JSONDecodeError, SafetensorError) as err:  # a damaged JSON file (tokenizers)
        raise ModelLoadError(f"could not load {name} ({class_name}) from {path / name}: {one_line(err)[:300]}; the "
                             "folder may be incomplete: download or copy it again") from err


def _freeze(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.requires_grad_(False).eval().to(dtype=dtype)


def _load_vae(cfg: ModelConfig, path: Path, index: dict, spec: FamilySpec, dtype: torch.dtype,
              variant: Optional[str], where: Optional[Tuple[Path, Optional[str]]]):
    """The pipeline's VAE, or cfg.vae (a VAE folder, or a pipeline folder with vae/, or a hub id; `where`, as
    `vae_folder` resolved it) instead."""
    from diffusers import AutoencoderKL

    if cfg.vae:
        vae = load_vae_folder(cfg.vae, lambda config: _vae_dtype(spec, config, dtype), cfg.variant, where=where)
        check_vae_scale(path, vae, f"model.vae={cfg.vae}")
    else:
        vae = _load_part(path, index, "vae", variant=variant,
                         dtype=_vae_dtype(spec, _part_config(AutoencoderKL, path, index, "vae"), dtype))
    return vae.requires_grad_(False).eval()


def _part_config(cls, path: Path, index: dict, name: str) -> dict:
    """`cls.load_config` of component `name`; a ModelLoadError for a part model_index.json lacks or a damaged file
    (tracebacks before, one naming the pipeline folder as the missing part's)."""
    if not index.get(name) or index[name][0] is None:
        raise ModelLoadError(f"{path}/model_index.json has no {name!r} component")
    try:
        return cls.load_config(path, subfolder=name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the {name} config in {path / name} ({one_line(err)[:200]}); the folder "
                             "may be damaged: download or copy it again") from err


def _vae_dtype(spec: FamilySpec, config: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    # An fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix) says so with force_upcast=False.
    return torch.float32 if spec.vae_fp32 and config.get("force_upcast", True) else dtype


def vae_folder(given: str, key: str = "model.vae") -> Tuple[Path, Optional[str]]:
    """(folder, subfolder) of a VAE given as its own folder, a pipeline folder holding vae/, or a hub id."""
    path = resolve_pretrained(given, pipeline=False, key=key)
    return path, "vae" if (path / "vae" / "config.json").is_file() else None


def load_vae_folder(given: str, dtype_for: Callable[[Mapping[str, Any]], torch.dtype], variant: Optional[str] = None,
                    key: str = "model.vae", where: Optional[Tuple[Path, Optional[str]]] = None):
    """The AutoencoderKL at `given` (`where`, else resolved by `vae_folder`) in `dtype_for(its config)`, of
    `variant` where it holds it (else its plain weights, else its one variant); ModelLoadError naming `key` when it
    cannot load."""
    from diffusers import AutoencoderKL

    path, subfolder = where or vae_folder(given, key)
    folder = path / subfolder if subfolder else path
    try:
        found = weights_variant(folder, variant, key, fallback=True, part="", warn=False)
        config = AutoencoderKL.load_config(path, subfolder=subfolder)
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, variant=found,
                                             **dtype_kwargs(dtype_for(config)))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{key}={given}: could not load a VAE from {folder} ({one_line(err)[:300]}); give a "
                             "VAE folder (config.json and weights) or a pipeline folder holding vae/") from err


def check_latent_channels(unet, vae, where: str, vae_key: str) -> None:
    """ModelLoadError when the UNet does not take the VAE's latents: found only at the first forward otherwise
    (conv_in's shape), after minutes of loading or caching."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelLoadError(f"{where}: its UNet takes {unet.config.in_channels} input channels and the VAE gives "
                             f"{vae.config.latent_channels}: an inpainting or instruct-pix2pix model (extra image "
                             f"channels) or a VAE of another model ({vae_key}); give a text-to-image model")


def vae_precision(vae):
    """The context every VAE call runs in: outside any autocast when the VAE's weights are fp32. They are fp32 on
    purpose (SDXL's VAE overflows in fp16, or model.weight_dtype says fp32), but an fp16 autocast around a training
    step or sampler (RAFT, reward fine-tuning, SePPO's re-encoding) would run its convolutions in fp16 anyway."""
    if vae.dtype == torch.float32:
        return torch.autocast(vae.device.type, enabled=False)
    return nullcontext()


def load_components(cfg: ModelConfig, device: Optional[Union[str, torch.device]] = None) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and a DDPM training scheduler as `cfg` says.

    Frozen parts are cast to cfg.weight_dtype; the UNet stays fp32 because it is trained (accelerate's mixed
    precision autocasts the forward) and gets the attention backend, checkpointing and memory format.
    """
    from diffusers import DDPMScheduler

    path = resolve_pretrained(cfg.pretrained, cfg.revision, cfg.variant, skip_parts=("vae",) if cfg.vae else ())
    check_tuned_folder(path, cfg.text_encoding)
    index, variant = read_index(path), weights_variant(path, cfg.variant)
    spec = model_family(cfg, path)
    check_listed_parts(path, spec, vae_given=bool(cfg.vae))
    dtype = torch_dtype(cfg.weight_dtype)
    tokenizers = [_load_part(path, index, tok) for tok, _ in spec.text_components]
    encoders = [_freeze(_load_part(path, index, enc, variant=variant), dtype) for _, enc in spec.text_components]
    for (name, _), tokenizer, encoder in zip(spec.text_components, tokenizers, encoders):
        check_tokenizer(path / name, tokenizer, encoder)
    where = vae_folder(cfg.vae) if cfg.vae else None
    vae = _load_vae(cfg, path, index, spec, dtype, variant, where)
    unet = _load_part(path, index, "unet", variant=variant, dtype=torch.float32)
    check_latent_channels(unet, vae, str(path), "model.vae")
    set_attention_backend(unet, cfg.attention)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    scheduler = latent_scheduler(DDPMScheduler, _part_config(DDPMScheduler, path, index, "scheduler"))
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):  # failed at the first training step
        raise ModelLoadError(f"{path}/scheduler: prediction_type {scheduler.config.prediction_type!r} is not "
                             "supported (epsilon or v_prediction)")
    if device is not None:
        for module in (*encoders, vae, unet):
            module.to(device)
    return Components(spec, tokenizers, encoders, vae, unet, scheduler, path, dtype,
                      text_encoding=copy.copy(cfg.text_encoding),
                      vae_dir=None if where is None else where[0] / (where[1] or ""))


def model_family(cfg: ModelConfig, path: Path) -> FamilySpec:
    """The family of pipeline folder `path`: model.family, or read from model_index.json when it is "auto"."""
    return detect_family(path) if cfg.family == "auto" else _explicit_family(cfg.family, path)


def _explicit_family(name: str, path: Path) -> FamilySpec:
    """model.family given by the user; reject it when model_index.json clearly names another family."""
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model.family={name!r}; use auto, " + ", ".join(FAMILIES))
    try:
        detected = detect_family(path)
    except UnsupportedPipeline:
        raise
    except ModelLoadError:  # unknown pipeline class: trust the user
        return FAMILIES[name]
    if detected.name != name:
        raise ModelLoadError(f"model.family={name} but {path}/model_index.json is a {detected.name} pipeline: point "
                             f"model.pretrained at a {name} folder, or train it with a {detected.name} config (e.g. "
                             f"configs/{detected.name}/; the {name} configs' resolution and settings are {name}'s) "
                             f"whose model.family is {detected.name} or auto")
    return detected


def check_attention_installed(backend: str) -> None:
    """ModelLoadError when model.attention names a package that is not installed (checked before a run loads)."""
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ModelLoadError("xformers was asked for (model.attention=xformers) but is not installed: pip install "
                             "'t2i-align[xformers]' or use model.attention=sdpa")


def set_attention_backend(unet: torch.nn.Module, backend: str) -> None:
    """"sdpa": PyTorch scaled_dot_product_attention (AttnProcessor2_0); "sdpa-<kernel>": the same held to one
    SDPA kernel (t2i_align/attention.py); "xformers": memory-efficient attention."""
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif backend.startswith("sdpa-") and backend in ATTENTION_CHOICES:
        try:
            from .attention import PinnedSDPAProcessor
        except ImportError as err:  # torch.nn.attention.sdpa_kernel is torch >= 2.3
            raise ModelLoadError(f"model.attention={backend} needs torch >= 2.3 ({err}); use model.attention=sdpa") \
                from err
        unet.set_attn_processor(PinnedSDPAProcessor(backend))
    elif backend == "xformers":
        check_attention_installed(backend)
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ValueError, RuntimeError, ModuleNotFoundError, NotImplementedError) as err:
            raise ModelLoadError(
                f"xformers is installed but could not be enabled ({err}); use model.attention=sdpa"
            ) from err
    else:
        raise ModelLoadError(f"unknown model.attention={backend!r}; use one of " + ", ".join(ATTENTION_CHOICES))


PIPELINE_COMPONENTS = "t2i_align_components"
"""Attribute of a diffusers pipeline holding the `Components` whose text parts and text encoding
`sampling.generate` encodes its prompts with (set by `build_pipeline` and `sampling.load_pipeline`)."""


def build_pipeline(components: Components, unet: Optional[torch.nn.Module] = None, scheduler: Any = None):
    """The family's diffusers pipeline over these components (the folder's own sampling scheduler by default)."""
    import diffusers

    index = read_index(components.path)
    parts = {"vae": components.vae, "unet": unet if unet is not None else components.unet}
    parts["scheduler"] = scheduler or _load_part(components.path, index, "scheduler")
    for (tok_name, enc_name), tok, enc in zip(
        components.spec.text_components, components.tokenizers, components.text_encoders
    ):
        parts[tok_name], parts[enc_name] = tok, enc
    pipeline_class = getattr(diffusers, components.spec.sampling_pipeline)
    extra = dict(components.spec.pipeline_extra_kwargs)
    if "force_zeros_for_empty_prompt" in index:  # an SDXL folder may say false (the class default is true)
        extra["force_zeros_for_empty_prompt"] = index["force_zeros_for_empty_prompt"]
    pipe = pipeline_class(**parts, **extra)
    # `sampling.generate` encodes prompts with these components, so it samples in the run's text encoding; its
    # own truncation count, so sampling does not add to the training prompts' count that the loop logs.
    setattr(pipe, PIPELINE_COMPONENTS, replace(
        components, unet=parts["unet"], scheduler=parts["scheduler"], truncation=components.sampling_truncation))
    return pipe
