"""LongAlign's segment-level text encoding: long prompts through CLIP's 77-token encoders.

Liu et al. 2024, "Improving Long-Text Alignment for Text-to-Image Diffusion Models" (arXiv 2410.11817, Sec. 3),
following the official code (github.com/luping-liu/LongAlign, `tools.py`: `collate_fn`, `caption2embed`):

1. split the caption into sentences (`caption_segments`); each sentence is tokenized and encoded on its own,
   so each is cut at 77 tokens (<sot> and <eot> included) instead of the whole caption;
2. from every segment keep its <sot> and word tokens, drop its <eot> and padding (the paper's best variant:
   keeping all <sot> tokens, removing <eot>, replacing <pad> by one fixed <pad*>), and concatenate;
3. cut the concatenation at the token budget (official: 240) or right-pad it with <pad*> = the mean of the last
   60 output positions of the empty prompt encoded at max_length 77 (fixed, not learned).

The output is always [B, token_budget, D], so batches stack and the negative prompt has the prompt's length;
SD1.5 / SDXL cross-attention takes any sequence length. `encode_segments_last_hidden` is SD1.5 (LongAlign's
setting) and `encode_segments_penultimate_pooled` carries the recipe to SDXL (see its docstring).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch

from .text import PromptEmbeds, TruncationStats, tokenize

if TYPE_CHECKING:
    from t2i_align.models import Components

PAD_POSITIONS = 60
"""<pad*> is the mean of the last 60 output positions (17..76) of "" encoded at 77 tokens, as the official code."""

# The official pattern r'"!|\.|\?|;"' splits on "." and "?" only (plus the literal strings '"!' and ';"'): an
# intended [.!?;] with misplaced quotes. We split on all four, but not before a digit ("3.5", ".5") or a closing
# quote or bracket ('says "OPEN!" on'), which the sentence goes on past, unless a capital letter or the caption's
# end follows the closing marks ('reads "OPEN." Below', "(see below.) A dog"): then the sentence ends there.
_SENTENCE_END = re.compile(r"[.!?;](?![\d\"'”’)\]])")
_QUOTED_END = re.compile(r"[.!?;]+([\"'”’)\]]+)(?=\s+\S|\s*$)")


def split_sentences(caption: str) -> List[str]:
    """The sentences of `caption`, stripped, without their final mark; empty pieces are dropped.

    Splits on ".", "!", "?" and ";" (the official regex means to but splits on "." and "?" only, see above), but
    not on a mark before a digit: "3.5 cm" and ".5 cm" stay whole (the official code splits them; we do not, so a
    number is not torn into two segments), nor before a closing quote or bracket (a quoted "OPEN!" is not a
    segment ending in a lone quote) unless a capital letter or the end follows them: 'reads "OPEN." Below it' is
    'reads "OPEN"' and 'Below it' (the official code splits there too, leaving a lone quote). Abbreviations
    ("e.g.") do split, as in the official code. Pieces of only whitespace are dropped too: the official code drops
    only empty ones, so the " " after a caption's last "." became a stray " ." segment there.
    """
    marked = _QUOTED_END.sub(lambda m: _quoted_end(m, caption), caption)
    pieces = (piece.strip() for part in marked.split("\0") for piece in _SENTENCE_END.split(part))
    return [piece for piece in pieces if piece]


def _quoted_end(m: "re.Match", caption: str) -> str:
    """A mark then closing quotes / brackets: the marks go and a split ("\0") follows the quotes when a capital
    letter or the caption's end comes next; else the text stays as it was (the sentence goes on)."""
    after = caption[m.end():].lstrip()[:1]
    return m.group(1) + "\0" if after == "" or after.isupper() else m.group(0)


def caption_segments(caption: str) -> List[str]:
    """What is encoded, one string per segment: each sentence + "." (the official code appends "." to every piece,
    so "!", "?" and ";" become "." too); a caption with no sentence in it (e.g. "" for classifier-free guidance,
    or only punctuation) is one segment, itself, as in the official code ("" thus encodes to <sot> then <pad*>)."""
    return [sentence + "." for sentence in split_sentences(caption)] or [caption]


SEGMENTS_PER_CALL = 256
"""Segments per text-encoder call: a batch of long captions holds up to batch × token_budget of them."""


def _hidden(encoder: Any, ids: torch.Tensor, penultimate: bool) -> torch.Tensor:
    out = encoder(ids.to(encoder.device), output_hidden_states=penultimate)
    return out.hidden_states[-2] if penultimate else out.last_hidden_state


def _tokenize_segments(tokenizer: Any, segments: List[str]) -> Tuple[torch.Tensor, List[int]]:
    """(ids [S, 77], kept [S]): kept[j] = tokens of segment j before its <eot> (its <sot> and words).

    The <eot> position comes from the attention mask (padding positions are 0), not from token ids: SDXL's
    tokenizer_2 pads with "!" (id 0), so the official `ids != pad_token_id` would also drop every real "!" word
    there. For SD1.5 both rules keep the same tokens (its pad is <|endoftext|> = <eot>, which never occurs inside).
    """
    batch = tokenizer(segments, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt")
    kept = batch.attention_mask.sum(dim=1) - 1
    eot = batch.input_ids.gather(1, kept[:, None]).squeeze(1)
    if not bool((eot == tokenizer.eos_token_id).all()):
        raise ValueError("segment encoding expects CLIP-style tokens: <sot> words <eot> then padding")
    return batch.input_ids, kept.tolist()


def _record_truncation(stats: TruncationStats, tokenizers: Sequence[Any], prompts: Sequence[str],
                       budget: int) -> None:
    """Per prompt, the most any of the tokenizers loses (SDXL's tokenizer_2 can split a few more tokens)."""
    dropped = [max(each) for each in zip(*(_dropped(t, prompts, budget) for t in tokenizers))]
    limit = tokenizers[0].model_max_length
    stats.record_dropped(dropped, f"exceed the segment encoding's limits ({limit} tokens per sentence, {budget} "
                                  "in all; LongAlign)")


def _dropped(tokenizer: Any, prompts: Sequence[str], budget: int) -> List[int]:
    """Per prompt: the prompt's tokens lost by cutting a sentence at 77 (the "." `caption_segments` appends is not
    the prompt's: a 75-word sentence loses only that) plus those beyond the budget (each segment's <sot> is not)."""
    limit = tokenizer.model_max_length
    dropped = []
    for prompt in prompts:
        segments, appended = caption_segments(prompt), int(bool(split_sentences(prompt)))
        lengths = [len(ids) for ids in tokenizer(segments, padding=False, truncation=False, verbose=False).input_ids]
        lost, start = 0, 0
        for n in lengths:
            kept = min(n, limit) - 1  # <sot> + words (+ ".") of the segment, at positions start..start+kept-1
            lost += max(0, n - limit - appended) + max(0, start + kept - max(start + 1, budget))
            start += kept
        dropped.append(lost)
    return dropped


def _concat(hidden: torch.Tensor, kept: List[int], counts: List[int], budget: int, pad: torch.Tensor) -> torch.Tensor:
    """[B, budget, D]: prompt b's segments' first kept[j] states, concatenated, cut at budget, padded with `pad`."""
    out = pad.to(hidden.dtype).expand(len(counts), budget, hidden.shape[-1]).clone()
    start = 0
    for b, n in enumerate(counts):
        rows = torch.cat([hidden[j, :kept[j]] for j in range(start, start + n)])[:budget]
        out[b, :len(rows)] = rows
        start += n
    return out


@torch.no_grad()
def encode_segments(tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], prompts: Sequence[str],
                    token_budget: int, *, penultimate: bool = False,
                    stats: Optional[TruncationStats] = None) -> torch.Tensor:
    """[B, token_budget, sum of the encoders' widths]: LongAlign's segment encoding with every (tokenizer,
    encoder) pair, concatenated per token along the feature dim (as SDXL concatenates its two encoders).

    `penultimate`: the penultimate hidden states (SDXL) instead of the last, final-layer-normed ones (SD1.5).
    Segments are padded to 77 tokens rather than to the longest segment (the official `padding=True`): CLIP's
    causal attention makes the kept positions the same either way, and a prompt's encoding then does not depend
    on the other prompts of its batch. `stats` counts prompts that lost tokens (a sentence over 77 tokens, or
    the concatenation over the budget).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: need at least 1 token")
    # each segment keeps at least its <sot>: the first token_budget segments fill the budget (a 10,000-sentence
    # caption otherwise went through the encoder whole: SDXL's hidden states of it alone took ~50 GB)
    per_prompt = [caption_segments(p)[:token_budget] for p in prompts]
    flat = [s for segments in per_prompt for s in segments]
    counts = [len(segments) for segments in per_prompt]
    if stats is not None:
        _record_truncation(stats, tokenizers, prompts, token_budget)
    features = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        # Each encoder keeps its own tokenizer's tokens: SDXL's tokenizer_2 treats its pad "!" as a special token
        # and so splits "!!" or '!"' where tokenizer 1 merges them; positions then drift by a token between the
        # two halves of the features, as they do in SDXL's own 77-token encoding.
        ids, kept = _tokenize_segments(tokenizer, flat + [""])  # the last row, "", gives <pad*>
        hidden = torch.cat([_hidden(encoder, ids[i:i + SEGMENTS_PER_CALL], penultimate)
                            for i in range(0, len(ids), SEGMENTS_PER_CALL)])
        pad = hidden[-1, -PAD_POSITIONS:].float().mean(dim=0)
        features.append(_concat(hidden[:-1], kept[:-1], counts, token_budget, pad))
    return torch.cat(features, dim=-1)


def encode_segments_last_hidden(components: "Components", prompts: Sequence[str]) -> PromptEmbeds:
    """SD1.5 (LongAlign's setting): segments through the CLIP text encoder's last hidden state."""
    embeds = encode_segments(components.tokenizers, components.text_encoders, prompts,
                             components.text_encoding.token_budget, stats=components.truncation)
    return PromptEmbeds(embeds)


def encode_segments_penultimate_pooled(components: "Components", prompts: Sequence[str]) -> PromptEmbeds:
    """SDXL: segments through both encoders' penultimate hidden states, concatenated per token on the feature dim
    (768 + 1280 = 2048), as SDXL's own 77-token encoding does; <pad*> is built per encoder from "" padded as that
    encoder's tokenizer pads it (tokenizer_2 pads with "!").

    The pooled embedding (`text_embeds`, one vector per prompt that SDXL adds to the time embedding) is the
    77-token one: encoder 2's projected pooled output of the whole prompt's first 77 tokens, exactly as the
    "clip77" encoding gives it. LongAlign has no SDXL recipe; we keep the global vector the base model was trained
    on (a mean of per-sentence pooled vectors would be a new input it never saw), so short prompts condition as
    before and the long-text information arrives through the token sequence, which is what LongAlign changes.
    """
    embeds = encode_segments(components.tokenizers, components.text_encoders, prompts,
                             components.text_encoding.token_budget, penultimate=True, stats=components.truncation)
    tokenizer, encoder = components.tokenizers[-1], components.text_encoders[-1]
    with torch.no_grad():
        pooled = encoder(tokenize(tokenizer, prompts).to(encoder.device)).text_embeds
    return PromptEmbeds(embeds, pooled)
