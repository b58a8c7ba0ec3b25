"""`imagereward` and `vp-score`: BLIP-based human-preference rewards, implemented natively (no `image-reward` package).

- ImageReward: Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
  Generation" (NeurIPS 2023, arXiv 2304.05977); reference code THUDM/ImageReward `ImageReward/ImageReward.py`.
- VP-Score: Wu et al. 2024, "Multimodal Large Language Model is a Human-Aligned Annotator for Text-to-Image
  Generation" (VisionPrefer, arXiv 2404.15100): the same architecture trained on VisionPrefer's AI-annotated pairs.

    score = (MLP( BERT_xattn(prompt | ViT(image)).[CLS] ) - mean) / std

Preprocessing follows the official `_transform(224)`: resize the short side to 224 (bicubic; on tensors with
antialiasing so it matches PIL closely and stays differentiable), centre crop 224, scale to [0, 1] and normalise
with the OpenAI CLIP mean/std below. Text: bert-base-uncased + [DEC] + [ENC] tokens, [CLS]-first, padded and
truncated to 35 tokens. The backbone and the checkpoint key mapping live in `blip_layout.py`.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from t2i_align.data.images import grey_to_8bit
from t2i_align.errors import load_refusal

from .base import (PathLike, Reward, RewardOutput, WeightsNotFoundError, check_tokenizer_vocabulary, one_image,
                   register, resolve_device, resolve_dtype, to_image_tensors, to_unit_float)
from .blip_layout import BlipRewardConfig, BlipRewardModel, load_official_state_dict

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
"""`self.mean` / `self.std` hard-coded in THUDM/ImageReward `ImageReward.__init__` (score normalisation)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP pixel statistics, used by ImageReward's `Normalize` (RGB order)."""


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit / 32-bit integer and float modes are rescaled to 8 bits first (PIL's own
    `convert` would clip them); everything else (L, P, RGBA, CMYK, YCbCr, ...) uses PIL's conversion."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot score an empty image of size {image.size}")
    image = grey_to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _tensor_to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] with C in {1, 2, 3, 4}, float in [0, 1] (a warning far outside), uint8 or uint16 -> float32
    [B, 3, H, W] (alpha dropped). float32 before resizing: in bf16 the resize and normalisation were ~0.02 off."""
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 2, 3, 4) or 0 in pixels.shape[2:]:
        raise ValueError(f"image tensors must be [B, C, H, W] with 1-4 channels and H, W > 0, "
                         f"got {tuple(pixels.shape)}")
    pixels = to_unit_float(pixels).float()
    if pixels.shape[1] <= 2:
        return pixels[:, :1].expand(-1, 3, -1, -1)
    return pixels[:, :3]


def preprocess_images(images, size: int = 224) -> torch.Tensor:
    """PIL images, a [B, C, H, W] tensor, or a list mixing PIL images, numpy HWC arrays and [C, H, W] tensors ->
    normalised float32 [B, 3, size, size]. Tensor inputs go through torch ops only, so gradients reach the pixels."""
    def fit(x):
        x = TF.center_crop(TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True), size)
        return x if isinstance(x, torch.Tensor) else TF.to_tensor(x).unsqueeze(0)

    if isinstance(images, torch.Tensor):
        batch = fit(_tensor_to_rgb(images))
    else:
        parts = []
        for image in images:
            if isinstance(image, Image.Image):
                parts.append(fit(_pil_to_rgb(image)))
            elif isinstance(image, torch.Tensor):
                parts.append(fit(_tensor_to_rgb(one_image(image)[None])))
            elif isinstance(image, np.ndarray):  # HWC, uint8 or float in [0, 1], as every reward takes them
                parts.append(fit(to_image_tensors([image])[0][None]))  # float32 RGB, range checked
            else:
                raise TypeError(f"images must be PIL images, numpy HWC arrays or tensors, not {type(image).__name__}")
        batch = torch.cat(parts) if parts else torch.zeros(0, 3, size, size)
    mean = torch.tensor(CLIP_MEAN, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def load_bert_tokenizer(tokenizer="bert-base-uncased"):
    """A BERT tokenizer (an object, or a folder / hub name for `BertTokenizer.from_pretrained`) with BLIP's extra
    tokens added as in BLIP's `init_tokenizer`: bos [DEC] and additional special [ENC] (a no-op if present)."""
    from transformers import BertTokenizer, PreTrainedTokenizerBase

    fix = ("pass tokenizer=FOLDER holding the bert-base-uncased vocab.txt (the ImageReward/VP-Score text side), e.g. "
           "from `hf download bert-base-uncased vocab.txt --local-dir FOLDER`")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        name = str(Path(tokenizer).expanduser()) if Path(tokenizer).expanduser().exists() else str(tokenizer)
        from t2i_align.model_folders import _hub_offline

        try:  # a local folder or the hub cache first: no network call, and none of its retries when there is none
            tokenizer = BertTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:  # TypeError: transformers 4 on a folder without vocab.txt
            if _hub_offline() or Path(name).exists():
                raise WeightsNotFoundError(f"could not load the BERT tokenizer {name!r}: {fix}") from err
            print(f"note: the BERT tokenizer {name!r} is not in the local Hugging Face cache: fetching it from the "
                  "hub (without a network this retries for minutes: set HF_HUB_OFFLINE=1, or pass tokenizer=FOLDER)",
                  file=sys.stderr)
            try:
                tokenizer = BertTokenizer.from_pretrained(name)
            except (OSError, ValueError) as err:
                raise WeightsNotFoundError(f"could not load the BERT tokenizer {name!r} (not in the local cache, and "
                                           f"the hub could not be reached or has no such tokenizer): {fix}") from err
    check_tokenizer_vocabulary(tokenizer, f"BERT tokenizer {getattr(tokenizer, 'name_or_path', '')!r}", fix)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _unwrap(state_dict):
    """Accept {'state_dict': ...} / {'model': ...} wrappers and DDP's 'module.' prefix around the plain dict."""
    while isinstance(state_dict, dict) and not any(str(k).startswith(("blip.", "mlp.")) for k in state_dict):
        inner = [state_dict[k] for k in ("state_dict", "model", "module") if isinstance(state_dict.get(k), dict)]
        if not inner:
            break
        state_dict = inner[0]
    if isinstance(state_dict, dict) and state_dict and all(str(k).startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


class BlipPreferenceReward(Reward):
    """Shared loader + scorer of the BLIP preference rewards (see the module docstring for the formula).

    Options: `checkpoint` (official-layout `.pt` state dict, or `.safetensors`), `tokenizer` (folder with the
    bert-base-uncased vocab, a hub name, or a tokenizer object), `config` (`BlipRewardConfig` or dict; defaults to
    the official ViT-L/16 + BERT-base sizes), `device`, `dtype` (model weights; the MLP head stays fp32 as in the
    official code), `batch_size` (images per forward), `mean` / `std` (score normalisation).
    """

    differentiable = True
    release = ""
    default_mean = IMAGEREWARD_MEAN
    default_std = IMAGEREWARD_STD

    def __init__(self, checkpoint: Optional[PathLike] = None, tokenizer: Union[PathLike, Any] = "bert-base-uncased",
                 config=None, device=None, dtype="float32", batch_size: int = 16, mean: Optional[float] = None,
                 std: Optional[float] = None):
        self.config = BlipRewardConfig.coerce(config)
        self.device = resolve_device(device)  # as every reward: None is CUDA where there is one
        self.dtype = resolve_dtype(dtype)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.mean = float(self.default_mean if mean is None else mean)
        self.std = float(self.default_std if std is None else std)
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        path = self._checkpoint_path(checkpoint)
        self.tokenizer = self._tokenizer(tokenizer)  # before reading the ~1.7 GB checkpoint: a missing one fails fast
        with torch.device("meta"):  # no random init of ~450M parameters; the checkpoint's tensors are assigned
            self.model = BlipRewardModel(self.config)
        self.unused_keys = load_official_state_dict(self.model, self._read(path), f"{path} ({self.name})")
        if self.unused_keys:
            warnings.warn(f"{self.name}: {len(self.unused_keys)} checkpoint keys were not used (the official loader "
                          f"also ignores them): {self.unused_keys[:8]}")
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model.mlp.float()

    def _tokenizer(self, tokenizer):
        tokenizer = load_bert_tokenizer("bert-base-uncased" if tokenizer is None else tokenizer)
        if len(tokenizer) > self.config.vocab_size:
            raise ValueError(f"{self.name}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary"
                             f" has {self.config.vocab_size}; use the bert-base-uncased tokenizer it was trained with")
        return tokenizer

    def _checkpoint_path(self, checkpoint) -> Path:
        if checkpoint is None:
            raise WeightsNotFoundError(f"{self.name} needs its weights, and nothing is downloaded: pass "
                                       f"checkpoint=PATH to {self.release}")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{self.name} checkpoint not found at {path}: expected {self.release}")
        return path

    def _read(self, path: Path):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state_dict = load_file(str(path), device="cpu")
            else:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
            raise ValueError(f"could not read the {self.name} checkpoint {path} ({load_refusal(err)}); "
                             f"expected {self.release}") from err
        state_dict = _unwrap(state_dict)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{self.name} checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
        return state_dict

    def tokenize(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """Official tokenization ([CLS] ... [SEP], padded/truncated to `config.max_length`) plus each prompt's
        untruncated token count, so truncation can be reported."""
        prompts = ["" if p is None else str(p) for p in prompts]
        limit = self.config.max_length
        encoded = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=limit,
                                 return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        return encoded["input_ids"], encoded["attention_mask"], lengths

    def score(self, images, prompts: List[str]) -> RewardOutput:
        """Scores [B] (float32, on `device`; differentiable w.r.t. tensor images) and info with `raw` (the MLP
        output before normalisation), `prompt_tokens` and `truncated`, the count of prompts cut to
        `config.max_length` tokens (an int, as the CLIP-family rewards report it)."""
        if not prompts:
            return torch.zeros(0, device=self.device), {"raw": [], "prompt_tokens": [], "truncated": 0}
        ids, mask, lengths = self.tokenize(prompts)
        needs_grad = torch.is_grad_enabled() and (
            images.requires_grad if isinstance(images, torch.Tensor)
            else any(isinstance(i, torch.Tensor) and i.requires_grad for i in images))
        raws = []
        with torch.set_grad_enabled(needs_grad):
            for start in range(0, len(prompts), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                pixels = preprocess_images(images[chunk], self.config.image_size).to(self.device)
                raws.append(self.model(pixels, ids[chunk].to(self.device), mask[chunk].to(self.device)))
        raw = torch.cat(raws)
        info = {"raw": raw.detach().cpu().tolist(), "prompt_tokens": lengths,
                "truncated": sum(n > self.config.max_length for n in lengths)}
        return (raw - self.mean) / self.std, info


@register("imagereward")
class ImageRewardScore(BlipPreferenceReward):
    """ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L/16 + BERT-base cross-attention + MLP, trained on ImageRewardDB
    (137k expert comparisons). Normalised with the official mean 0.16717362830052426 / std 1.0333394966054072."""

    release = ("`ImageReward.pt` of the ImageReward-v1.0 release (Hugging Face repo THUDM/ImageReward, file "
               "ImageReward.pt; code github.com/THUDM/ImageReward), a state dict in the official blip.* / mlp.* layout")
    paths = {"checkpoint": release}


@register("vp-score")
class VPScore(BlipPreferenceReward):
    """VP-Score (Wu et al. 2024, VisionPrefer): the ImageReward architecture trained on VisionPrefer.

    Normalisation: the VisionPrefer release is used through ImageReward's loader (`ImageReward.load(path)`), whose
    class hard-codes ImageReward's mean/std, so those are the defaults here too; this is not verified against a
    VP-Score-specific constant (the VisionPrefer code could not be consulted here) - pass `mean`/`std`
    to override.
    """

    release = ("the VP-Score checkpoint of the VisionPrefer release (github.com/yushuiwx/VisionPrefer; Wu et al. 2024,"
               " arXiv 2404.15100), an ImageReward-layout (blip.* / mlp.*) `.pt` state dict")
    paths = {"checkpoint": release}
    default_mean = IMAGEREWARD_MEAN
    default_std = IMAGEREWARD_STD
