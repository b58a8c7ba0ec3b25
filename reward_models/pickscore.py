"""PickScore (Kirstain et al. 2023, arXiv 2305.01569; github.com/yuvalkirstain/PickScore) and the
transformers-CLIP <-> open_clip weight converters.

PickScore is a transformers `CLIPModel` folder (hf.co/yuvalkirstain/PickScore_v1) used with the processor of
hf.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Score, as in the official README: `logit_scale.exp() · cos(img, txt)`
(about 100 · cos; a softmax over candidate images gives preference probabilities). The image side is
preprocessed with torch ops (shortest side -> 224 bicubic, centre crop, OpenAI mean/std), so it is differentiable.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .base import (PathLike, Reward, RewardOutput, RewardSetupError, WeightsNotFoundError, check_tokenizer_vocabulary,
                   load_checked, load_state_dict_file, read_json_file, register, require_path, resize_center_crop,
                   without_random_init)
from .clip import OPENAI_MEAN, OPENAI_STD, ClipEncoder

# transformers name -> open_clip name, inside one transformer block
_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm": "ln_final", "logit_scale": "logit_scale",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post"}
_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
           "vision_model.encoder.layers.": "visual.transformer.resblocks."}
_PROJ = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}


def _rename(key: str, table: Dict[str, str]) -> Optional[str]:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def hf_clip_to_open_clip(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers `CLIPModel` state_dict -> open_clip `CLIP` state_dict.

    q/k/v projections are concatenated into `in_proj_*`, projections transposed; `position_ids` buffers dropped.
    Keys it does not know are kept as they are, so a strict load reports them.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _PROJ:
            out[_PROJ[key]] = value.T.contiguous()
            continue
        new = _rename(key, _TOP)
        for src, dst in _TOWERS.items():
            if new is None and key.startswith(src):
                rest = key[len(src):]
                m = re.match(r"(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", rest)
                if m:
                    qkv.setdefault(f"{dst}{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
                    new = ""
                else:
                    layer, _, tail = rest.partition(".")
                    new = f"{dst}{layer}." + (_rename(tail, _BLOCK) or tail)
        if new != "":
            out[new if new is not None else key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def open_clip_to_hf_clip(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_clip_to_open_clip` (open_clip `CLIP` -> transformers `CLIPModel`)."""
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("attn_mask", "logit_bias"):
            continue
        if key in {v: k for k, v in _PROJ.items()}:
            out[{v: k for k, v in _PROJ.items()}[key]] = value.T.contiguous()
            continue
        new = _rename(key, inv_top)
        for hf, oc in _TOWERS.items():
            if new is None and key.startswith(oc):
                layer, _, tail = key[len(oc):].partition(".")
                if tail.startswith("attn.in_proj_"):
                    kind = tail.rsplit("_", 1)[1]
                    for name, part in zip("qkv", value.chunk(3, dim=0)):
                        out[f"{hf}{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
                    new = ""
                else:
                    new = f"{hf}{layer}." + (_rename(tail, inv_block) or tail)
        if new != "":
            out[new if new is not None else key] = value
    return out


def hf_clip_config(config):
    """A transformers `CLIPConfig` from config.json's dict (or as is): configs may hold only non-default values."""
    from transformers import CLIPConfig

    return config if isinstance(config, CLIPConfig) else CLIPConfig.from_dict(config)


def hf_config_to_open_clip(config) -> Dict[str, Any]:
    """transformers CLIPConfig (or its dict, e.g. config.json) -> open_clip model config."""
    config = hf_clip_config(config)
    t, v = config.text_config, config.vision_config
    acts = {t.hidden_act, v.hidden_act}
    if len(acts) != 1 or acts - {"gelu", "quick_gelu"}:
        raise ValueError(f"open_clip needs one activation, gelu or quick_gelu, in both towers; got {acts}")
    return {"embed_dim": config.projection_dim, "quick_gelu": acts == {"quick_gelu"},
            "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                           "layers": v.num_hidden_layers, "mlp_ratio": v.intermediate_size / v.hidden_size,
                           "head_width": v.hidden_size // v.num_attention_heads},
            "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                         "width": t.hidden_size, "heads": t.num_attention_heads,
                         "layers": t.num_hidden_layers, "mlp_ratio": t.intermediate_size / t.hidden_size}}


def hf_preprocess_cfg(folder: Path, config) -> Dict[str, Any]:
    """Size / mean / std from a processor folder's preprocessor_config.json (CLIP defaults if it is absent);
    `config`: the model's CLIPConfig or its dict."""
    size = hf_clip_config(config).vision_config.image_size
    path = Path(folder) / "preprocessor_config.json"
    pre = read_json_file(path) if path.is_file() else {}
    crop, resize = pre.get("crop_size", size), pre.get("size", None)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return {"size": crop, "shortest_edge": resize.get("shortest_edge", crop) if isinstance(resize, dict) else
            (resize or crop),
            "mean": tuple(pre.get("image_mean", OPENAI_MEAN)), "std": tuple(pre.get("image_std", OPENAI_STD)),
            "interpolation": _hf_resample(_check_processor(pre, path), path), "floor_offset": True}


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes; 1 (Lanczos) has no torch op
_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")


def _check_processor(pre: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """`pre`, or RewardSetupError for a processor we would preprocess differently from transformers (scores
    would silently differ from the model's own): every step on, pixels rescaled by 1/255."""
    off = [step for step in _STEPS if pre.get(step, True) is False]
    if off:
        raise RewardSetupError(f"{path}: {', '.join(off)} false is not supported (scoring always resizes the short "
                               "side, centre-crops, rescales to [0, 1] and normalises); set it true or remove it")
    factor = pre.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor * 255 - 1) > 1e-6:
        raise RewardSetupError(f"{path}: rescale_factor {factor!r} is not supported (scoring reads pixels in [0, 1], "
                               "1/255 of their bytes); use 0.00392156862745098 or remove it")
    return pre


def _hf_resample(pre: Dict[str, Any], path: Path) -> str:
    """The resize's interpolation (PIL's code), or RewardSetupError for one torch has no op for."""
    code = pre.get("resample", 3)
    if code not in _RESAMPLE:
        raise RewardSetupError(f"{path}: resample {code!r} is not supported; use 0 (nearest), 2 (bilinear) or "
                               "3 (bicubic, CLIP's)")
    return _RESAMPLE[code]


class HFClipEncoder(ClipEncoder):
    """transformers `CLIPModel` + its tokenizer."""

    def __init__(self, model, tokenizer, pre: Dict[str, Any], **kw):
        super().__init__(model, pre["size"], pre["mean"], pre["std"], pre["interpolation"], **kw,
                         resize=partial(resize_center_crop, floor_offset=True, shortest_edge=pre["shortest_edge"]))
        self.tokenizer = tokenizer
        self.context_length = model.config.text_config.max_position_embeddings

    def _image_features(self, pixels):
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _text_features(self, texts: List[str]):
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feats, [n > self.context_length for n in lengths]


def load_hf_clip(model_dir: Optional[PathLike], processor_dir: Optional[PathLike], what: str, source: str,
                 **encoder_options) -> HFClipEncoder:
    """Build `CLIPModel` from config.json and load its weights with a key check (no remote code, no pickles)."""
    from transformers import AutoTokenizer, CLIPModel

    folder = require_path(model_dir, what, source)
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"{what}: {folder} has no config.json. Expected: {source}")
    config = hf_clip_config(read_json_file(folder / "config.json"))  # not JSON: one line naming it, read once
    proc = _processor_folder(processor_dir, folder, what, source)  # before the weights: minutes for PickScore's
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(proc))
    except (OSError, ValueError, TypeError) as e:
        raise WeightsNotFoundError(f"{what}: no CLIP tokenizer in {proc} ({e}). Expected: {source}") from e
    check_tokenizer_vocabulary(tokenizer, f"{what} ({proc})", f"expected: {source}")
    pre = hf_preprocess_cfg(proc, config)
    with without_random_init():
        model = CLIPModel(config)
    load_checked(model, load_state_dict_file(folder), str(folder))
    return HFClipEncoder(model, tokenizer, pre, **encoder_options)


def _processor_folder(processor_dir: Optional[PathLike], folder: Path, what: str, source: str) -> Path:
    """The processor's folder: `processor_dir` (a folder, or a hub name found in the local cache, or fetched when
    online: as a folder, so that its preprocessor_config.json is read; transformers' tokenizer found the name but
    the preprocessing fell back to CLIP's defaults), else the model's own folder."""
    if processor_dir is None:
        return folder
    if Path(processor_dir).expanduser().is_dir():
        return Path(processor_dir).expanduser()
    from huggingface_hub import snapshot_download

    from t2i_align.model_folders import _hub_offline

    try:
        return Path(snapshot_download(str(processor_dir), allow_patterns=["*.json", "*.txt"],
                                      local_files_only=_hub_offline()))
    except Exception as err:  # hub errors have many types (offline, HTTP, no such repo); all mean the same here
        raise WeightsNotFoundError(f"{what}: processor_dir {processor_dir} is neither a folder nor a hub name in the "
                                   f"local cache ({type(err).__name__}). Expected: {source}") from err


@register("pickscore")
class PickScore(Reward):
    """`logit_scale.exp() · cos(img, txt)` with PickScore_v1. Differentiable on the image side."""

    differentiable = True
    source = ("a local copy of https://huggingface.co/yuvalkirstain/PickScore_v1 (config.json + model.safetensors) "
              "as model_dir, and processor_dir = a copy of https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-"
              "b79K (tokenizer + preprocessor_config.json), e.g. `hf download <repo> --local-dir DIR`")
    paths = {"model_dir": source}  # processor_dir may be a hub name in the cache (`_processor_folder`)

    def __init__(self, model_dir: Optional[PathLike] = None, processor_dir: Optional[PathLike] = None,
                 device=None, dtype=None, batch_size: int = 16):
        self.encoder = load_hf_clip(model_dir, processor_dir, "pickscore weights", self.source, device=device,
                                    dtype=dtype, batch_size=batch_size)

    def score(self, images, prompts: List[str]) -> RewardOutput:
        text, truncated = self.encoder.encode_texts(prompts)
        cosine = (self.encoder.encode_images(images) * text).sum(-1)
        return self.encoder.logit_scale * cosine, {"cosine": cosine.detach().cpu().tolist(),
                                                   "truncated": sum(truncated)}
