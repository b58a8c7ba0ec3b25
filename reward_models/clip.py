"""CLIP score on any open_clip architecture (`clip`), and the toy world's learned CLIP score (`toy-clip`).

Score convention: `scale · cos(image, text)` with scale = 100 by default, per image: torchmetrics' CLIPScore
*without* its clamp at 0 (it clamps the batch mean, so non-negative means agree; a clamp would kill gradients).
Hessel et al. 2021 (arXiv 2104.08718) define CLIP-S as 2.5 · max(cos, 0): scale=2.5 where cos > 0. Radford et al. 2021
(arXiv 2103.00020) for the model; open_clip (github.com/mlfoundations/open_clip) for the architectures.

Weights (`checkpoint=`): a state_dict file in open_clip's layout (.safetensors / .pt / .bin) for `arch`; an
open_clip folder (open_clip_config.json + weights, the layout of `local-dir:`); a transformers CLIPModel folder
(converted with `pickscore.hf_clip_to_open_clip`); "toy" for the shipped toy CLIP ("toy-denscore": the toy
Denscore, `t2i_align/toy/denscore.py`); or an open_clip pretrained
tag such as "openai" (downloaded by open_clip, so online only).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .base import (PathLike, Resize, Reward, RewardOutput, RewardSetupError, WeightsNotFoundError, batched,
                   find_weights_file, load_checked, load_state_dict_file, preprocess_images, read_json_file, register,
                   resize_center_crop, resolve_device, resolve_dtype, without_random_init)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Arch = Union[str, Dict[str, Any]]


class ClipEncoder:
    """A frozen image tower + text tower with their preprocessing. Features come back L2-normalised, float32.

    Subclasses provide `_image_features(pixels)` and `_text_features(texts) -> (features, truncated flags)`.
    The text side always runs under no_grad; the image side keeps the graph when grad mode is on.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                 interpolation: str = "bicubic", device=None, dtype=None, batch_size: int = 32,
                 resize: Resize = resize_center_crop):
        self.resize = resize  # how images reach size x size (HPSv2 pads instead of cropping)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        # read before the cast: PickScore's exp(4.6052) = 100.0 would be 98.86 from a bf16 logit_scale
        scale = getattr(model, "logit_scale", None)
        self._logit_scale = None if scale is None else float(scale.detach().float().exp().reshape(-1)[0])
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.interpolation, self.batch_size = interpolation, batch_size

    def encode_images(self, images) -> torch.Tensor:
        images = images if isinstance(images, torch.Tensor) and images.dim() == 4 else list(images)
        feats = []
        for s in batched(len(images), self.batch_size):
            pixels = preprocess_images(images[s], self.image_size, self.mean, self.std,
                                       self.device, self.dtype, self.interpolation, self.resize)
            feats.append(self._image_features(pixels).float())
        return F.normalize(torch.cat(feats), dim=-1)

    def encode_texts(self, texts: List[str]) -> Tuple[torch.Tensor, List[bool]]:
        feats, truncated = [], []
        with torch.no_grad():
            for s in batched(len(texts), self.batch_size):
                f, t = self._text_features(texts[s])
                feats.append(f.float())
                truncated += t
        return F.normalize(torch.cat(feats), dim=-1), truncated

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale), from the weights' own precision (fp32 as stored), whatever dtype the model runs in."""
        if self._logit_scale is None:
            raise AttributeError(f"{type(self.model).__name__} has no logit_scale")
        return self._logit_scale

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: List[str]) -> Tuple[torch.Tensor, List[bool]]:
        raise NotImplementedError


class OpenClipEncoder(ClipEncoder):
    """open_clip CLIP / CustomTextCLIP with its tokenizer."""

    def __init__(self, model, tokenizer, context_length: int, **kw):
        visual_size = model.visual.image_size
        super().__init__(model, visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size, **kw)
        self.tokenizer, self.context_length = tokenizer, context_length

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        ids = self.tokenizer(texts, context_length=self.context_length).to(self.device)
        return self.model.encode_text(ids), [n > self.context_length for n in self.token_counts(texts)]

    def token_counts(self, texts: List[str]) -> List[int]:
        """Untruncated lengths including the start / end tokens."""
        tok = self.tokenizer
        if hasattr(tok, "sot_token_id"):  # open_clip's SimpleTokenizer (CLIP BPE)
            return [len(tok.encode(t)) + 2 for t in texts]
        if hasattr(tok, "tokenizer"):  # open_clip's HFTokenizer wrapper
            return [len(ids) for ids in tok.tokenizer(texts)["input_ids"]]
        return [0 for _ in texts]


def _model_from_cfg(cfg: Dict[str, Any]) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(cfg)
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa-style configs (multimodal_cfg) are not supported by the CLIP rewards")
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    return (CustomTextCLIP if custom else CLIP)(**cfg)


def _cfg_for(arch: Arch) -> Dict[str, Any]:
    if isinstance(arch, dict):
        return arch
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    return cfg


def _tokenizer_for(name: Optional[str], cfg: Dict[str, Any]):
    """open_clip's own choice for open_clip folders (their tokenizer files) and pretrained tags (online); else a
    config's `hf_tokenizer_name` from a local folder only (a named arch's hub tokenizer is not fetched for a local
    weights file); else CLIP's BPE tokenizer."""
    import open_clip

    text = cfg.get("text_cfg", {})
    context_length = text.get("context_length", 77)
    if "hf_tokenizer_name" not in text:
        return open_clip.SimpleTokenizer(context_length=context_length)
    if name is not None:
        return open_clip.get_tokenizer(name)
    folder = text["hf_tokenizer_name"]
    if not Path(folder).is_dir():  # a hub name: CLIP's BPE instead would score garbage, and nothing is downloaded
        raise RewardSetupError(f"arch names the tokenizer {folder!r} (text_cfg.hf_tokenizer_name), not a local folder:"
                               f" `hf download {folder} --local-dir DIR` and name DIR there instead (for"
                               " a named arch, pass its config dict, open_clip.get_model_config(NAME), with that"
                               " change)")
    mode = {"tokenizer_mode": text["tokenizer_mode"]} if text.get("tokenizer_mode") else {}  # older open_clip lacks it
    return open_clip.tokenizer.HFTokenizer(str(folder), context_length=context_length, **mode,
                                           **text.get("tokenizer_kwargs", {}))


def resize_squash(x: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """open_clip's resize_mode "squash" (SigLIP): the whole image to size x size, aspect ratio not kept."""
    aa = interpolation in ("bilinear", "bicubic")
    return F.interpolate(x, size=(size, size), mode=interpolation, antialias=aa,
                         **({"align_corners": False} if aa else {}))


def _resize_for(pre: Dict[str, Any]) -> Resize:
    """The resize of open_clip's preprocess_cfg `resize_mode`; "longest" (resize and pad) is refused."""
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise RewardSetupError(f"preprocess_cfg resize_mode {mode!r} is not supported: only 'shortest' (resize + "
                               "centre crop) and 'squash'; use a checkpoint whose open_clip config has one of them")
    if mode == "squash":
        return resize_squash
    edge = pre.get("shortest_edge")  # a transformers processor folder's resize, when it differs from its crop
    # a transformers folder (Denscore): its processor's crop starts at (n - size) // 2, as PickScore's does
    return partial(resize_center_crop, shortest_edge=edge, floor_offset=bool(pre.get("floor_offset")))


def _hf_folder(folder: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
    from .pickscore import hf_clip_config, hf_clip_to_open_clip, hf_config_to_open_clip, hf_preprocess_cfg

    config = hf_clip_config(read_json_file(folder / "config.json"))  # defaults filled in
    state = hf_clip_to_open_clip(load_state_dict_file(folder))
    return hf_config_to_open_clip(config), state, hf_preprocess_cfg(folder, config)


def _read_local(arch: Optional[Arch], path: Path, what: str, source: str):
    """(model config, open_clip state_dict, preprocess config, tokenizer name) from a local file or folder."""
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        meta = read_json_file(path / "open_clip_config.json", ["model_cfg"])
        weights = find_weights_file(path)
        if weights is None:
            raise WeightsNotFoundError(f"{what}: {path} has open_clip_config.json but no weights. {source}")
        return meta["model_cfg"], load_state_dict_file(weights), meta.get("preprocess_cfg", {}), f"local-dir:{path}"
    if path.is_dir() and (path / "config.json").is_file():
        return (*_hf_folder(path), None)
    if path.is_dir():
        raise WeightsNotFoundError(f"{what}: {path} has neither open_clip_config.json nor a transformers "
                                   f"config.json. Expected: {source}")
    if arch is None:
        raise ValueError(f"{what}: a checkpoint file needs `arch` (an open_clip model name or config dict)")
    state = load_state_dict_file(path)
    if any(k.startswith("vision_model.") for k in state):  # transformers CLIPModel layout
        from .pickscore import hf_clip_to_open_clip
        state = hf_clip_to_open_clip(state)
    return _cfg_for(arch), state, {}, None  # not open_clip's name lookup: it would fetch a hub tokenizer


@contextmanager
def _no_root_errors():
    """open_clip logs a failed download as an `ERROR:root:` line; the error raised after it says the same."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def load_open_clip(arch: Optional[Arch], checkpoint: Optional[PathLike], what: str, source: str,
                   pretrained_tags: bool = True, floor_offset: Optional[bool] = None,
                   default_arch: Optional[str] = None, **encoder_options) -> OpenClipEncoder:
    """Build the architecture, load the checkpoint (see the module docstring for what it may be), wrap it.
    `pretrained_tags`: whether an open_clip tag (laion2b_s32b_b79k) may name the weights; not for a reward whose
    weights no tag holds (HPSv2: the tag's plain CLIP would be scored under its name). `floor_offset`: where the
    centre crop starts whatever the checkpoint says (False: torchvision's rounded offset, also for a transformers
    folder, whose processor floors it). `default_arch`: the architecture of a file or tag when `arch` is None; a
    folder names its own, so an `arch` given with one is unused, and a warning says so."""
    import open_clip

    if checkpoint in ("toy", "toy-denscore"):
        from t2i_align.toy.assets import REBUILD_HINT, clip_dir, denscore_dir
        checkpoint, source = ((clip_dir(), f"the shipped toy CLIP. {REBUILD_HINT}") if checkpoint == "toy" else
                              (denscore_dir(), "the shipped toy Denscore; build it alone with `python -m "
                               "t2i_align.toy build --only denscore` (about 20 minutes on one core)"))
    if arch is not None and checkpoint is not None and Path(checkpoint).is_dir():
        given = arch if isinstance(arch, str) else "a config dict"
        warnings.warn(f"{what}: arch={given} is not used: the folder {checkpoint} names its own architecture in its "
                      "config file (drop arch, or give a weights file)", stacklevel=2)
    arch = default_arch if arch is None else arch
    if checkpoint is not None and Path(checkpoint).exists():
        cfg, state, pre, name = _read_local(arch, Path(checkpoint), what, source)
        with without_random_init():
            model = _model_from_cfg(cfg)
        load_checked(model, state, str(checkpoint))
    elif pretrained_tags and isinstance(arch, str) and checkpoint is not None and str(checkpoint) in \
            open_clip.list_pretrained_tags_by_model(arch):
        try:
            with _no_root_errors():
                model = open_clip.create_model(arch, pretrained=str(checkpoint))  # downloads: online only
        except Exception as e:
            raise WeightsNotFoundError(f"{what}: open_clip could not fetch {checkpoint!r} ({e}). "
                                       f"Offline, pass a local file instead: {source}") from e
        cfg, pre, name = _cfg_for(arch), dict(getattr(model.visual, "preprocess_cfg", {}) or {}), arch
    else:
        where = "no checkpoint was given" if checkpoint is None else f"{checkpoint} does not exist"
        raise WeightsNotFoundError(f"{what}: {where}. Expected: {source}")
    opts = dict(mean=pre.get("mean", OPENAI_MEAN), std=pre.get("std", OPENAI_STD),
                interpolation=pre.get("interpolation", "bicubic"))
    opts.update(encoder_options)
    if "resize" not in opts:  # a reward's own resize (HPSv2's) wins over the config's
        opts["resize"] = _resize_for(pre if floor_offset is None else {**pre, "floor_offset": floor_offset})
    return OpenClipEncoder(model, _tokenizer_for(name, cfg), cfg["text_cfg"].get("context_length", 77), **opts)


@register("clip")
class ClipScore(Reward):
    """`scale · cos(E_img(x), E_txt(p))`, scale = 100 (CLIPScore without the clamp at 0). Differentiable."""

    differentiable = True
    default_checkpoint: Optional[str] = None
    path_names = ("toy", "toy-denscore")
    open_clip_checkpoint = True
    source = ("an open_clip checkpoint for `arch`, e.g. open_clip_model.safetensors from "
              "https://huggingface.co/timm/vit_large_patch14_clip_224.openai with arch='ViT-L-14-quickgelu', "
              "or checkpoint='openai' to let open_clip download it (needs network)")
    paths = {"checkpoint": source}

    def __init__(self, arch: Optional[Arch] = None, checkpoint: Optional[PathLike] = None,
                 scale: float = 100.0, device=None, dtype=None, batch_size: int = 32):
        """`arch`: a weights file's or tag's open_clip architecture (default ViT-L-14-quickgelu); a folder
        names its own."""
        checkpoint = checkpoint if checkpoint is not None else self.default_checkpoint
        self.encoder = load_open_clip(arch, checkpoint, f"{self.name} weights", self.source, device=device,
                                      dtype=dtype, batch_size=batch_size, default_arch="ViT-L-14-quickgelu")
        self.scale = float(scale)

    def score(self, images, prompts: List[str]) -> RewardOutput:
        text, truncated = self.encoder.encode_texts(prompts)
        cosine = (self.encoder.encode_images(images) * text).sum(-1)
        return self.scale * cosine, {"cosine": cosine.detach().cpu().tolist(), "truncated": sum(truncated)}


@register("toy-clip")
class ToyClip(ClipScore):
    """The toy world's contrastively trained CLIP (t2i_align/toy/build.py), 32 px input, 100 · cos."""

    default_checkpoint = "toy"
    paths = {"checkpoint": None}

    def __init__(self, checkpoint: Optional[PathLike] = None, scale: float = 100.0, device=None, dtype=None,
                 batch_size: int = 64):
        super().__init__(None, checkpoint, scale=scale, device=device, dtype=dtype, batch_size=batch_size)
