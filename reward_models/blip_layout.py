"""The BLIP preference backbone of ImageReward / VP-Score, built on transformers' BLIP modules, and the documented
mapping between the official checkpoint layout and ours.

ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", NeurIPS, arXiv 2304.05977) is BLIP (Li et al. 2022): a ViT image encoder, a BERT text encoder whose
layers cross-attend to the image tokens, and an MLP head on the text [CLS] state. VP-Score (Wu et al. 2024,
"Multimodal Large Language Model is a Human-Aligned Annotator for Text-to-Image Generation", arXiv 2404.15100)
reuses the architecture with VisionPrefer-trained weights.

Official layout (THUDM/ImageReward `ImageReward.py`: `self.blip = BLIP_Pretrain(...)`, `self.mlp = MLP(768)`):
`blip.visual_encoder.*` (BLIP's timm-style ViT), `blip.text_encoder.*` (BLIP `med.py` BertModel without pooler),
`blip.vision_proj.*` / `blip.text_proj.*` (contrastive projections, unused for scoring) and `mlp.layers.{0,2,4,6,7}`
(Linear 768-1024-128-64-16-1 with dropouts at 1, 3, 5 and no activations). `KEY_MAP` below is the whole mapping;
BLIP's BERT and transformers' `BlipTextModel` share module names, so the text side only loses its prefix.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

KEY_MAP: Tuple[Tuple[str, str], ...] = (
    # (official key, our key); {i} = block / layer index, {p} = weight|bias, {rest} = any suffix
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm1.{p}", "vision.encoder.layers.{i}.layer_norm1.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm2.{p}", "vision.encoder.layers.{i}.layer_norm2.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision.encoder.layers.{i}.mlp.fc1.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision.encoder.layers.{i}.mlp.fc2.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    ("blip.text_encoder.{rest}", "text.{rest}"),
    ("mlp.layers.{i}.{p}", "mlp.layers.{i}.{p}"),
)

IGNORED_OFFICIAL_KEYS: Tuple[str, ...] = (
    r"blip\.(vision_proj|text_proj)\..*",            # ITC projections of BLIP_Pretrain: not used by the score
    r"blip\.text_encoder\.embeddings\.position_ids",  # a buffer (arange), rebuilt by transformers
)

_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)", "{rest}": r"(?P<rest>.+)"}


def _pattern(template: str) -> "re.Pattern[str]":
    regex = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape(name), group)
    return re.compile(f"^{regex}$")


def _rename(key: str, forward: bool) -> Optional[str]:
    for official, ours in KEY_MAP:
        source, target = (official, ours) if forward else (ours, official)
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def official_to_native(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename an official-layout state dict to ours. Returns (renamed, leftovers): leftovers are keys that match no
    rule (ignored keys such as `blip.vision_proj.*` are dropped silently)."""
    renamed, leftovers = {}, []
    for key, value in state_dict.items():
        if any(re.fullmatch(p, key) for p in IGNORED_OFFICIAL_KEYS):
            continue
        new = _rename(key, forward=True)
        if new is None:
            leftovers.append(key)
        else:
            renamed[new] = value
    return renamed, leftovers


def native_to_official(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse mapping (used to export, and by the tests to write official-layout checkpoints)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, forward=False)
        if new is None:
            raise KeyError(f"no official name for {key!r}")
        out[new] = value
    return out


@dataclasses.dataclass
class BlipRewardConfig:
    """Sizes of the backbone. Defaults are ImageReward's: `BLIP_Pretrain(image_size=224, vit='large')` is ViT-L/16
    (1024 wide, 24 blocks, 16 heads, MLP 4096, LayerNorm eps 1e-6), and BLIP's `med_config.json` is BERT-base (768
    wide, 12 layers, 12 heads, MLP 3072, eps 1e-12, 512 positions, vocab 30524 = bert-base-uncased + [DEC] + [ENC])
    with cross-attention keys/values of the ViT width."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    max_length: int = 35
    """Text context: ImageReward tokenizes with `padding='max_length', truncation=True, max_length=35`."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), int) or getattr(self, field.name) <= 0:
                raise ValueError(f"BlipRewardConfig.{field.name} must be a positive int")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("BlipRewardConfig: widths must be divisible by their head counts")
        if self.image_size % self.patch_size:
            raise ValueError("BlipRewardConfig: image_size must be a multiple of patch_size")
        if self.max_length > self.max_positions:
            raise ValueError("BlipRewardConfig: max_length exceeds max_positions")

    @classmethod
    def coerce(cls, config) -> "BlipRewardConfig":
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown BlipRewardConfig fields: {sorted(unknown)}")
            return cls(**config)
        raise ValueError(f"config must be a BlipRewardConfig, a mapping of its fields or None, not "
                         f"{type(config).__name__} (a Python option: t2i-score uses the official sizes)")


class RewardHead(nn.Module):
    """ImageReward's `MLP(768)`: linear layers 768-1024-128-64-16-1, dropout 0.2/0.2/0.1, no activations."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class BlipRewardModel(nn.Module):
    """ViT -> BERT with cross-attention -> [CLS] -> MLP head; `forward` returns the raw (unnormalised) reward [B]."""

    def __init__(self, config: BlipRewardConfig):
        super().__init__()
        self.config = config
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=config.vision_width, intermediate_size=config.vision_mlp,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
            image_size=config.image_size, patch_size=config.patch_size, layer_norm_eps=1e-6, hidden_act="gelu"))
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=config.vocab_size, hidden_size=config.text_width, encoder_hidden_size=config.vision_width,
            intermediate_size=config.text_mlp, num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads, max_position_embeddings=config.max_positions,
            layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            bos_token_id=None, eos_token_id=None, sep_token_id=None,  # unused by an encoder; tiny vocabs lack them
            is_decoder=True),  # is_decoder=True only builds the cross-attention; forward runs bidirectionally
            add_pooling_layer=False)
        self.mlp = RewardHead(config.text_width)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_atts, is_decoder=False)
        features = text.last_hidden_state[:, 0, :].float()  # the official code scores the [CLS] state in fp32
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)


def _listing(title: str, items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def load_official_state_dict(model: BlipRewardModel, state_dict: Mapping[str, torch.Tensor],
                             source: str) -> List[str]:
    """Load an official-layout state dict into `model`, which may live on the meta device (tensors are assigned,
    not copied, so a full-size model is never randomly initialised). Raises ValueError listing missing, unexpected
    and wrong-shape keys (in official names) when the checkpoint does not fit the configured architecture. Keys
    outside the mapped layout (e.g. an extra head) are returned instead: the official loader uses `strict=False`."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    renamed, leftovers = official_to_native(tensors)
    leftovers += sorted(k for k in state_dict if k not in tensors)
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in expected]
    wrong = [f"{_rename(k, False)} {tuple(renamed[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in renamed and renamed[k].shape != v.shape]
    if missing or wrong or unexpected:  # a mapped key the model lacks = more blocks/layers than configured
        cfg = model.config
        message = (f"checkpoint {source} does not fit the configured BLIP reward architecture (ViT {cfg.vision_width}"
                   f" wide x {cfg.vision_layers} blocks at {cfg.image_size}px, BERT {cfg.text_width} wide x "
                   f"{cfg.text_layers} layers, vocab {cfg.vocab_size}); keys in the official layout:")
        message += _listing("missing", [_rename(k, forward=False) or k for k in missing]) if missing else ""
        message += _listing("unexpected", [_rename(k, False) or k for k in unexpected] + leftovers) \
            if unexpected or leftovers else ""
        message += _listing("wrong shape (checkpoint vs model)", wrong) if wrong else ""
        raise ValueError(message + "\nPass a `config` matching the checkpoint, or check that the file is right.")
    model.load_state_dict({k: renamed[k] for k in expected}, strict=True, assign=True)  # works on a meta model
    # the one buffer (not saved by transformers, dropped from official files) is rebuilt off the meta device
    model.text.embeddings.position_ids = torch.arange(model.config.max_positions).expand(1, -1)
    return leftovers
