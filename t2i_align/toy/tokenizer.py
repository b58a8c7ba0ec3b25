"""A genuine `CLIPTokenizer` for the toy pipeline, built from the CLIP BPE vocabulary that open_clip ships.

SD1.5's tokenizer is OpenAI CLIP's: 49,408 tokens, 77-token context, <|endoftext|> as padding. Building it from
the same BPE merges makes token ids and truncation in the toy world behave exactly as with real SD weights.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2  # as in CLIP's simple_tokenizer: 48,894 merges, vocab 49,408
CONTEXT_LENGTH = 77


def build_clip_tokenizer(out_dir: str | os.PathLike) -> CLIPTokenizer:
    """Write vocab.json + merges.txt from open_clip's BPE file and return the saved `CLIPTokenizer`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    # The "#version" header line is what CLIP's own merges.txt starts with; the tokenizer skips it.
    (out / "merges.txt").write_text("\n".join(["#version: 0.2"] + merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=CONTEXT_LENGTH)
    tok.save_pretrained(str(out))
    # Keep the layout of the real SD1.5 folder (vocab.json + merges.txt): tokenizer.json would add 3.6 MB.
    (out / "tokenizer.json").unlink(missing_ok=True)
    return tok
