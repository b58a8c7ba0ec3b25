"""PPD's stage 1: a user embedding from a vision-language model that has read a few of the user's labelled pairs.

Dang et al., "Personalized Preference Fine-tuning of Diffusion Models" (CVPR 2025, arXiv 2501.06655); the official
stage-1 code is `llava_embeddings/pick_a_pick_user_emb.py` of github.com/Asap7772/Personalized-Text-To-Image-Diffusion
(Apache-2.0, commit fe3835f). What is reproduced from it:

- the model family: LLaVA-OneVision (the official checkpoint is lmms-lab/llava-onevision-qwen2-7b-ov-chat; here any
  local folder in transformers' format, e.g. llava-hf/llava-onevision-qwen2-7b-ov-chat-hf), in fp16;
- the prompt, character for character (`ppd_question`, `qwen_chat`), with its quirks ("2st pair", "the four
  pairs" for 3 and 5 shots, the instruction lines' source indentation that its `dedent` does not remove);
- images in the order preferred_1, dispreferred_1, ..., each padded to a square first (its image_aspect_ratio="pad");
- greedy decoding (`do_sample=False`; the official temperature 0.7 is passed but unused), 1024 new tokens at most;
- the embedding: the hidden state of the last decoding step's token from every layer, embedding output first and
  the final-normed state last, [L + 1, D] = [29, 3584] for Qwen2-7B.

- each image as one 384 px tile and a newline token (729 + 1 tokens), as LLaVA-NeXT's "pad" mode encodes the
  several images of one prompt: the images go to transformers' processor as one sample's list, whose multi-image
  path skips the anyres tiles (transformers >= 4.53, tested on 5.24 only; given as a flat list, each image was
  taken as its own sample and tiled: 5-10x the tokens, past Qwen2's 32k context for eight 1024 px images; so until
  session 22).

Not reproduced: the numbers themselves. transformers' classes are not LLaVA-NeXT's own (the official code's), so
embeddings made here are not bit for bit those of PPD's released JSON files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from t2i_align.errors import UserError

NUM_SHOTS_SUPPORTED = (2, 3, 4, 5)
"""The official script has a prompt for 2, 3, 4 and 5 shots (PPD uses 4)."""
IMAGE_TOKEN = "<image>"
_INDENT = " " * 24  # the instruction block's indentation in the official source; its dedent() keeps it
_COUNT_WORD = {2: "two", 3: "four", 4: "four", 5: "four"}  # sic: the official prompt says "four" for 3 and 5


def ppd_question(captions: Sequence[str]) -> str:
    """The official stage-1 question for len(captions) pairs (one <image> per preferred / dispreferred image).

    Built like the official code: a header, per pair four pieces each starting " \\n\\n" (the ordinal is "{i}st"
    for every i), then the instruction block; then `textwrap.dedent(...).strip()`, whose only effect there is to
    empty the whitespace-only lines (the header is unindented, so no margin is removed)."""
    import textwrap

    n = len(captions)
    if n not in NUM_SHOTS_SUPPORTED:
        raise ValueError(f"PPD's stage-1 prompt exists for {NUM_SHOTS_SUPPORTED} shots, not {n}")
    text = "You will be shown a few examples of preferred and dispreferred images."
    for i, caption in enumerate(captions):
        text += (f" \n\nHere is the {i + 1}st pair of images: \n\nHere is the caption: {caption}"
                 f" \n\n{IMAGE_TOKEN} This is the preferred image. \n\n{IMAGE_TOKEN} This is the dispreferred image.")
    lines = ["1. For each pair of images, describe the preferred image and the dispreferred image. ",
             "2. Explain the differences between the two images in terms of style, visual quality, and image "
             "aesthetics.",
             "3. After you have described all of the images, summarize the differences between the preferred and "
             "dispreferred images into a user profile. ", "",
             f"Format your response as follows for the {_COUNT_WORD[n]} pairs of images:"]
    for i in range(n):
        lines += [f"Pair {i + 1}:", "Preferred Image: [Description]", "Dispreferred Image: [Description]",
                  "Differences: [Description]", ""]
    lines += ["User Profile: [Description]"]
    text += (" \n\nYou will be judging the images according to their style, visual quality, and image aesthetics. "
             "Follow the instructions below to compare the images:\n")
    text += "".join(_INDENT + line + "\n" for line in lines) + " " * 20
    return textwrap.dedent(text).strip()


def qwen_chat(question: str) -> str:
    """LLaVA's "qwen_1_5" conversation (ChatML) with the question as the user turn and the assistant's turn open."""
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def pad_to_square(image: Any, fill: Tuple[int, int, int]) -> Image.Image:
    """The image (PIL, or uint8 [H, W, 3]) centred on a square of colour `fill` (LLaVA's expand2square, its
    image_aspect_ratio="pad")."""
    image = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class TransformersTooOld(UserError, ImportError):
    """The installed transformers lacks what PPD's user encoder needs: an `error:` line, not a traceback."""


@dataclass(frozen=True)
class LabelledPair:
    """One shot: a caption with the user's preferred and dispreferred images (PIL or uint8 [H, W, 3]); the toy
    world's `Shot` has the same fields."""

    caption: str
    preferred: Any
    dispreferred: Any


@dataclass
class LlavaEmbedding:
    embedding: torch.Tensor
    """[layers + 1, width], float32 on the CPU."""
    text: str
    """What the model wrote (the pair descriptions and the "User Profile")."""


class LlavaUserEncoder:
    """Shots -> PPD user embedding with a LLaVA-OneVision model in transformers' format, loaded from a local folder."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 1024):
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, int(max_new_tokens)
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = tuple(int(m * 255) for m in mean)  # as LLaVA's expand2square: truncated (0.5 -> 127)

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, dtype: torch.dtype = torch.float16,
                        max_new_tokens: int = 1024) -> "LlavaUserEncoder":
        import transformers
        from packaging.version import Version

        version = Version(transformers.__version__)
        if version < Version("4.53"):  # its processor's multi-image path (batch_num_images) came in 4.53
            raise TransformersTooOld(f"PPD's user embeddings need transformers >= 4.53 (installed: {version}), whose "
                              "LLaVA-OneVision encodes several images of one prompt as PPD does; upgrade it")
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

        processor = LlavaOnevisionProcessor.from_pretrained(path, local_files_only=True)
        dtype_key = "dtype" if version >= Version("4.56") else "torch_dtype"  # renamed in 4.56
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # device_map: the weights go straight to this process's device (built on the CPU first, a 7B model took
        # ~15 GB of host memory per process: 8 processes, 120 GB at once)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, local_files_only=True,
                                                                       device_map={"": device}, **{dtype_key: dtype})
        return cls(model, processor, max_new_tokens)

    def inputs(self, shots: Sequence[LabelledPair]) -> dict:
        """The processor's tensors for the official prompt and images (preferred, dispreferred per pair)."""
        images: List[Image.Image] = []
        for shot in shots:
            images += [pad_to_square(shot.preferred, self.fill), pad_to_square(shot.dispreferred, self.fill)]
        prompt = qwen_chat(ppd_question([shot.caption for shot in shots]))
        # one sample's images (nested): one tile each, as the official "pad" mode; a flat list would be tiled
        batch = self.processor(text=prompt, images=[images], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        # token_type_ids: the Qwen2 processor of transformers 4 returns them, and generate refuses them there
        return {k: v.to(self.model.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()
                if k != "token_type_ids"}

    def encode(self, shots: Sequence[LabelledPair]) -> torch.Tensor:
        """One user's embedding [layers + 1, width] (the user-encoder interface the toy encoder shares)."""
        return self.encode_with_text(shots).embedding

    @torch.no_grad()
    def encode_with_text(self, shots: Sequence[LabelledPair]) -> LlavaEmbedding:
        inputs = self.inputs(shots)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  return_dict_in_generate=True, output_hidden_states=True)
        last_step = out.hidden_states[-1]  # per layer [1, tokens of that step, width]: keep the last token
        embedding = torch.cat([layer[:, -1] for layer in last_step], dim=0).float().cpu()
        new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
        text = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return LlavaEmbedding(embedding, text)
