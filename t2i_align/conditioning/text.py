"""Prompt encoding for SD1.5 and SDXL, and the extra UNet inputs SDXL needs.

The family-specific functions here (`encode_clip_last_hidden`, `encode_clip_penultimate_pooled`,
`no_added_cond`, `text_time_added_cond`) are referenced by the per-family `FamilySpec` in `t2i_align.models`;
callers use `encode_prompts(components, prompts)` and `unet_added_cond_kwargs(spec, embeds, time_ids)` and never
branch on the family themselves. `encode_prompts` also applies the run's text encoding (`components.text_encoding`:
"clip77" or LongAlign's "segments", `t2i_align.conditioning.segments`), and `write_text_encoding` /
`read_text_encoding` record that choice next to exported weights, so a tuned model is sampled as it was trained.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from t2i_align.config import ConfigError
from t2i_align.config.sections import FieldError, TextEncodingConfig
from t2i_align.files import write_json_atomic

if TYPE_CHECKING:  # models.py imports this module, so only import it for type checkers
    from t2i_align.models import Components, FamilySpec

SizeLike = Union[Sequence[int], torch.Tensor]


@dataclass
class PromptEmbeds:
    """Text conditioning for one batch of prompts."""

    prompt_embeds: torch.Tensor
    """[B, L, D] token embeddings fed to the UNet's cross-attention (`encoder_hidden_states`)."""
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    """[B, D2] pooled text embedding (SDXL's `text_embeds`); None for SD1.5."""
    user_tokens: Optional[torch.Tensor] = None
    """[B, T, D_user] user tokens for PPD's user branch (t2i_align/conditioning/users.py), one user per row; None
    without one. They travel with the prompt so denoiser closures keep their signature."""

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, *args: Any, **kwargs: Any) -> "PromptEmbeds":
        """Same as `Tensor.to` on every tensor (device and/or dtype)."""
        pooled, users = self.pooled_prompt_embeds, self.user_tokens
        pooled = None if pooled is None else pooled.to(*args, **kwargs)
        users = None if users is None else users.to(*args, **kwargs)
        return PromptEmbeds(self.prompt_embeds.to(*args, **kwargs), pooled, users)

    def repeat(self, n: int) -> "PromptEmbeds":
        """[e; e; ...] n times along the batch: DPO runs winners and losers as one [w; l] batch."""
        pooled, users = self.pooled_prompt_embeds, self.user_tokens
        return PromptEmbeds(self.prompt_embeds.repeat(n, 1, 1), None if pooled is None else pooled.repeat(n, 1),
                            None if users is None else users.repeat(n, 1, 1))


@dataclass
class TruncationStats:
    """Running count of prompts longer than the text encoder's context (77 tokens for CLIP).

    CLIP silently drops everything past its context, which quietly ruins long-prompt experiments (the reason
    LongAlign exists). We warn on the first truncation only, so a training loop does not print it every step, and
    keep the totals so the loop can log them.
    """

    prompts_seen: int = 0
    prompts_truncated: int = 0
    tokens_dropped: int = 0
    warned: bool = False
    totals: str = "training logs the totals (prompts_truncated)"
    """Where the totals are read, in the warning ("" for sampling, whose count nothing logs)."""

    def record(self, lengths: Sequence[int], max_length: int) -> None:
        """Count prompts of `lengths` tokens (with <sot>/<eot>) read through a `max_length`-token context."""
        self.record_dropped(
            [max(0, n - max_length) for n in lengths],
            f"are longer than the text encoder's {max_length}-token context (only the first {max_length} tokens "
            "condition the model)",
        )

    def record_dropped(self, dropped: Sequence[int], why: str) -> None:
        """Count one entry per prompt: how many of its tokens the encoding dropped; `why` ends the warning's
        "N of M prompts ..." clause."""
        lost = [n for n in dropped if n > 0]
        self.prompts_seen += len(dropped)
        self.prompts_truncated += len(lost)
        self.tokens_dropped += sum(lost)
        if lost and not self.warned:
            self.warned = True
            hint = "" if "segment" in why else (" LongAlign's segment encoding reads long prompts whole "
                                                 "(model.text_encoding.kind=segments; --text-encoding segments).")
            warnings.warn(
                f"{len(lost)} of {len(dropped)} prompts {why}; {sum(lost)} tokens were dropped (up to {max(lost)} "
                f"from one prompt). Warned once, for the first batch that had any"
                f"{'; ' + self.totals if self.totals else ''}.{hint}",
                stacklevel=7,  # the caller of encode_prompts (the encoders are wrapped by torch.no_grad)
            )


def tokenize(tokenizer: Any, prompts: Sequence[str], stats: Optional[TruncationStats] = None) -> torch.Tensor:
    """Token ids [B, model_max_length], padded and truncated as the diffusers pipelines do.

    With `stats`, prompts are also tokenized untruncated to count what truncation drops.
    """
    prompts = list(prompts)
    max_length = tokenizer.model_max_length
    if stats is not None:
        full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
        stats.record([len(ids) for ids in full], max_length)
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.input_ids


@torch.no_grad()
def encode_clip_last_hidden(components: "Components", prompts: Sequence[str]) -> PromptEmbeds:
    """SD1.5: the last hidden state of the single CLIP text encoder (no attention mask, as the pipeline does)."""
    (tokenizer,), (encoder,) = components.tokenizers, components.text_encoders
    ids = tokenize(tokenizer, prompts, components.truncation).to(encoder.device)
    return PromptEmbeds(encoder(ids).last_hidden_state)


@torch.no_grad()
def encode_clip_penultimate_pooled(components: "Components", prompts: Sequence[str]) -> PromptEmbeds:
    """SDXL: penultimate hidden states of both encoders concatenated on the feature dim (768 + 1280 = 2048 for
    the real model), and the projected pooled output (`text_embeds`) of the last encoder, as
    StableDiffusionXLPipeline.encode_prompt does."""
    hidden = []
    for i, (tokenizer, encoder) in enumerate(zip(components.tokenizers, components.text_encoders)):
        # Both tokenizers share CLIP's vocabulary; count truncation once, not once per encoder.
        ids = tokenize(tokenizer, prompts, components.truncation if i == 0 else None).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return PromptEmbeds(torch.cat(hidden, dim=-1), out.text_embeds)  # last encoder: CLIPTextModelWithProjection


def encode_prompts(components: "Components", prompts: Sequence[str]) -> PromptEmbeds:
    """Encode prompts with the frozen text encoder(s) of `components`, whatever the family, in the run's text
    encoding: `components.text_encoding.kind` "clip77" (the family's own 77-token encoding) or "segments"
    (LongAlign's sentence-by-sentence encoding, always `token_budget` tokens long)."""
    kind = components.text_encoding.kind
    if kind == "clip77":
        return components.spec.encode_prompts(components, list(prompts))
    if kind == "segments":
        return components.spec.encode_segments(components, list(prompts))
    raise ValueError(f"unknown text encoding {kind!r}; use clip77 or segments")


TEXT_ENCODING_FILE = "t2i_align_text_encoding.json"
"""Written next to exported weights (a LoRA file or a full pipeline folder) by `write_text_encoding`."""


def write_text_encoding(folder: Union[str, Path], kind: str, token_budget: int) -> Path:
    """Record the text encoding a model was tuned with in `folder`/t2i_align_text_encoding.json (atomic write);
    `sampling.load_pipeline` reads it back, so the model is sampled with the encoding it learned."""
    record = TextEncodingConfig(kind=kind, token_budget=token_budget)  # validates both
    return write_json_atomic(Path(folder) / TEXT_ENCODING_FILE,
                             {"kind": record.kind, "token_budget": record.token_budget})


def text_encoding_key(encoding: TextEncodingConfig) -> dict:
    """Cache-key part for cached text embeddings: {} for clip77 (caches made before the choice existed keep
    their key), the kind and the token budget for segments (the budget is the embeddings' length) and the
    sentence split's version (2 since session 29: no split before a digit, closing quote or bracket)."""
    if encoding.kind == "clip77":
        return {}
    return {"text_encoding": encoding.kind, "token_budget": encoding.token_budget, "sentence_split": 2}


def read_text_encoding(folder: Union[str, Path]) -> Optional[TextEncodingConfig]:
    """The text encoding recorded in `folder` (or in the folder of a weights file), None when nothing is."""
    folder = Path(folder)
    path = (folder.parent if folder.is_file() else folder) / TEXT_ENCODING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TextEncodingConfig(kind=data["kind"], token_budget=int(data["token_budget"]))
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, a missing key, FieldError (a ValueError)
        why = err.args[0] if isinstance(err, FieldError) else f"{type(err).__name__}: {err}"
        raise ConfigError(f"{path} is not a valid text-encoding record ({why}); it should read "
                          '{"kind": "clip77" or "segments", "token_budget": N}') from err


def _as_pairs(value: SizeLike) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1, 2)


def sdxl_time_ids(
    original_size: SizeLike, crop_top_left: SizeLike, target_size: SizeLike, batch_size: Optional[int] = None
) -> torch.Tensor:
    """SDXL micro-conditioning `add_time_ids` = original_size (h, w) + crop_top_left (y, x) + target_size (h, w).

    Each argument is one (a, b) pair for the whole batch or a [B, 2] tensor/list with one pair per image (the
    true size and crop, as in diffusers PR #6668). Returns float32 [B, 6]; B is the largest row count or
    `batch_size`.
    """
    parts = [_as_pairs(original_size), _as_pairs(crop_top_left), _as_pairs(target_size)]
    rows = batch_size or max(p.shape[0] for p in parts)
    for part in parts:
        if part.shape[0] not in (1, rows):
            raise ValueError(f"time-id inputs have {part.shape[0]} rows but the batch has {rows}")
    return torch.cat([p.expand(rows, 2) for p in parts], dim=1)


def no_added_cond(embeds: PromptEmbeds, time_ids: Optional[torch.Tensor] = None) -> dict:
    """SD1.5's UNet takes no added conditioning."""
    return {}


def text_time_added_cond(embeds: PromptEmbeds, time_ids: Optional[torch.Tensor] = None) -> dict:
    """SDXL's UNet (`addition_embed_type="text_time"`) needs the pooled text embedding and the time ids."""
    if embeds.pooled_prompt_embeds is None:
        raise ValueError("SDXL needs pooled prompt embeddings; encode the prompts with the SDXL components")
    if time_ids is None:
        raise ValueError(
            "SDXL needs time_ids: build them with sdxl_time_ids(original_size, crop_top_left, target_size)"
        )
    pooled = embeds.pooled_prompt_embeds
    # float32 on purpose: sizes like 1023 are not exact in bf16, and the UNet's sinusoidal projection upcasts anyway.
    time_ids = time_ids.to(device=pooled.device, dtype=torch.float32)
    if time_ids.shape[0] == 1 and pooled.shape[0] > 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    if time_ids.shape[0] != pooled.shape[0]:
        raise ValueError(f"time_ids has {time_ids.shape[0]} rows but the prompt batch has {pooled.shape[0]}")
    return {"text_embeds": pooled, "time_ids": time_ids}


def unet_added_cond_kwargs(
    spec: "FamilySpec", embeds: PromptEmbeds, time_ids: Optional[torch.Tensor] = None
) -> dict:
    """`added_cond_kwargs` for `unet(...)`: {} for SD1.5, {"text_embeds", "time_ids"} for SDXL."""
    return spec.added_cond_kwargs(embeds, time_ids)
