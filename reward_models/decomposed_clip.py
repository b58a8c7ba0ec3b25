"""LongAlign's decomposed, reweighted CLIP preference score (Liu et al., "Improving Long-Text Alignment for
Text-to-Image Diffusion Models", ICLR 2025, arXiv 2410.11817; code github.com/luping-liu/LongAlign, `loss.py::
dense_score` with `do_ortho=True`).

Text side (no_grad): the prompt is split into sentences s_k, each encoded and L2-normalised to t_k (truncated to
the text context on its own), and t = mean_k t_k, *not* re-normalised. Image side (differentiable): x, the
normalised image embedding. With v the unit common text direction and η = t·v:

    t = η v + t⊥,          S = t·x = t⊥·x + η (v·x)          (total = text-relevant + text-irrelevant)
    S_ω = t⊥·x + ω η (v·x) = (t - (1-ω)(t·v) v)·x             (ω = 0.3 as in the code; ω = 1 gives S)

ω, code and paper: the released code reweights the *score* as above (env `REWEIGHT`, default 0.3; the loss is
0.5·(1 - S_ω) - 0.09·(1 - ω)). The paper calls this "gradient reweighting": since t and v do not depend on the
image, ∇S_ω = ∇(t⊥·x) + ω ∇(η v·x), the text-irrelevant gradient scaled by ω, which is the same thing. Only the
value differs from S, by -(1-ω)·η(v·x); the code's constant -0.09·(1-ω) shifts the logged loss back as if that
part were 0.18 and has no gradient. We return S_ω and report S, both parts and η in `info`.

The common direction v: the released code recomputes it every step as normalize(mean of t over the batch,
all-gathered over GPUs), so a score depends on the batch it came in and on the number of processes. Here v is
fitted once from a prompt set (`fit_prompts=` or `fit_direction`), saved with the run as safetensors
(`save_direction`) and loaded on resume or by other processes (`direction=PATH`), so scores compare across
batches, processes and resumes. The file also keeps the text encoder's embedding of a fixed probe sentence, a
fingerprint: a direction fitted with another CLIP of the same width is refused on load. `direction="batch"`
keeps the code's per-call batch statistic, process-local: the code takes it over the whole optimizer step's batch
all-gathered over GPUs (8 prompts x 6 GPUs = 48), so it matches the code only when one micro-batch is that batch
(batch_size = the code's global batch, grad_accum 1, one process); for parity experiments only. Without a
direction and nothing to fit from the reward refuses to score, unless ω = 1 (S_1 = S whatever v is).

Scores are the raw cosine-like values (no logit scale, as in the code), times `scale` (default 1; the paper's
tables report 100·S). Any CLIP loadable by `clip.load_open_clip` serves as the backbone: Denscore
(hf.co/luping-liu/Denscore, a transformers CLIPModel folder), PickScore, HPSv2, "toy" for the toy CLIP, or
"toy-denscore" for the toy Denscore (`t2i_align/toy/denscore.py`: the toy CLIP fine-tuned so that every sentence
of a long caption counts).
"""
from __future__ import annotations

import hashlib
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .base import CheckpointMismatchError, PathLike, Reward, RewardOutput, RewardSetupError, register, require_path
from .clip import Arch, load_open_clip

SOURCE = ("a CLIP backbone: a local copy of https://huggingface.co/luping-liu/Denscore (transformers CLIPModel "
          "folder, as in LongAlign), any folder or file `clip` accepts (with arch=...), checkpoint='toy' or "
          "'toy-denscore'")
DIRECTION_SOURCE = "a file written by DecomposedClip.save_direction (the run folder keeps one)"
NO_DIRECTION = ("decomposed-clip has no common direction v: pass direction=FILE (written by save_direction), "
                "fit_prompts=[...] or a prompts file / toy:train to fit it once (or, in training only, "
                "direction='batch' for the released code's per-batch statistic: scores then depend on the batch)")
# The encoder fingerprint: its unit embedding of this sentence, saved beside v. Rounding (bf16 vs fp32, CPU vs GPU)
# moves it by far less than 1 - PROBE_MIN_COSINE; another CLIP's embedding points elsewhere.
PROBE_TEXT = "a photo of a red cube on a wooden table"
PROBE_MIN_COSINE = 0.99


def split_sentences(text: str) -> List[str]:
    """Sentences ending in . ! ? or ; followed by whitespace, or by a closing quote or bracket then whitespace and a
    capital ('reads "OPEN." Below'; the closing mark stays) (LongAlign's regex, fixed as the reference advises:
    the released one misses plain ! and ; and splits decimals). No sentence -> the whole text, even if empty.
    Each keeps its own mark. Not the segment encoder's rule (`t2i_align.conditioning.segments.caption_segments`:
    also splits "cat.Dog", and ends every piece in ".", as the official code scores them too): the two agree on
    captions of whitespace-separated sentences ending in ".", such as the toy world's long captions."""
    stripped = text.strip()
    marked = _BREAK.sub(lambda m: m.group(1) + "\0" if _ends(m, stripped) else m.group(0), stripped)
    parts = [p.strip() for p in marked.split("\0")]
    return [p for p in parts if p] or [text]


_BREAK = re.compile(r"([.!?;][\"'”’)\]]*)\s+")


def _ends(m: "re.Match", text: str) -> bool:
    """A sentence ends at a mark and whitespace, or at a mark, closing quotes / brackets and whitespace before a
    capital letter ('"OPEN." Below'; lower case goes on: '"hi." she said')."""
    closed = len(m.group(1)) > 1
    return not closed or text[m.end():m.end() + 1].isupper()


def mean_sentence_vectors(encode: Callable[[List[str]], torch.Tensor], prompts: Sequence[str], split: bool = True
                          ) -> Tuple[torch.Tensor, List[int]]:
    """t per prompt: the mean of its sentences' unit embeddings, not re-normalised (LongAlign's `dense_score`),
    and each sentence's prompt index. `encode(sentences) -> [n, D]` unit vectors (with or without gradients)."""
    segments = [split_sentences(p) if split else [p] for p in prompts]
    owner = [i for i, segs in enumerate(segments) for _ in segs]
    feats = encode([s for segs in segments for s in segs])
    index = torch.tensor(owner, device=feats.device)
    sums = torch.zeros(len(prompts), feats.shape[1], device=feats.device, dtype=feats.dtype).index_add(0, index, feats)
    counts = torch.bincount(index, minlength=len(prompts)).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype), owner


def exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the decomposition's sums, except on MPS, which has no float64 (float32 there: errors ~1e-7)."""
    return torch.float32 if device.type == "mps" else torch.float64


def decompose(t: torch.Tensor, v: torch.Tensor, x: torch.Tensor, omega: float) -> Dict[str, torch.Tensor]:
    """The LongAlign split of S = t·x for text vectors t [B, D], unit direction v [D], image embeddings x [B, D].

    Computed in float64 (`exact_dtype`), so `total - (relevant + irrelevant)` is at rounding level (~1e-16) and
    ω = 1 reproduces the total. Returns total, relevant (t⊥·x), irrelevant (η v·x), eta and weighted
    (relevant + ω·irrelevant).
    """
    dtype = exact_dtype(t.device)
    t, v, x = t.to(dtype), F.normalize(v.to(dtype), dim=0), x.to(dtype)  # unit v in float64: t⊥ ⟂ v exactly
    eta = t @ v
    t_perp = t - eta[:, None] * v[None]
    relevant = (t_perp * x).sum(-1)
    irrelevant = eta * (x @ v)
    return {"total": (t * x).sum(-1), "relevant": relevant, "irrelevant": irrelevant, "eta": eta,
            "weighted": relevant + omega * irrelevant}


BATCH_OF_ONE = ("decomposed-clip with direction='batch' got a batch of one prompt (or copies of one): v is then its t, "
                "t⊥ = 0 and nothing is decomposed (the score is ω·S, as in the released code); score batches of "
                "several prompts, or fit the direction once (fit_prompts=...)")


def fit_common_direction(text_vectors: Callable[[List[str]], torch.Tensor], prompts: Sequence[str],
                         chunk_size: int = 4096) -> torch.Tensor:
    """v = normalize(mean over `prompts` of t(p)), unit float32 [D]; `text_vectors(prompts) -> [n, D]`.

    Summed in float64 (`exact_dtype`) a chunk at a time, so a data set of millions of captions fits without
    holding every t.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("fitting the common direction needs at least one prompt")
    total = None
    for start in range(0, len(prompts), chunk_size):
        vectors = text_vectors(prompts[start:start + chunk_size])
        part = vectors.to(exact_dtype(vectors.device)).sum(0)
        total = part if total is None else total + part
    return F.normalize(total / len(prompts), dim=0).float()


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt list (one per line), stored with a fitted direction to say what it was fitted on."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def save_direction(path: PathLike, direction: torch.Tensor, metadata: Dict[str, str],
                   probe: Optional[torch.Tensor] = None) -> None:
    """v and its metadata; `probe`, the encoder's embedding of PROBE_TEXT, lets a load check the encoder."""
    from safetensors.torch import save_file

    tensors = {"direction": direction}
    if probe is not None:
        tensors["probe"] = probe
    save_file({k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def load_direction(path: PathLike) -> Tuple[torch.Tensor, Dict[str, str]]:
    """(unit direction float32 [D], the metadata it was saved with)."""
    return _read_direction(path)[:2]


def _read_direction(path: PathLike) -> Tuple[torch.Tensor, Dict[str, str], Optional[torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    path = require_path(path, "decomposed-clip common direction", DIRECTION_SOURCE)
    try:
        with safe_open(str(path), "pt") as f:
            if "direction" not in f.keys():
                raise CheckpointMismatchError(f"{path} holds no 'direction' tensor: not a direction file. "
                                              f"Expected: {DIRECTION_SOURCE}")
            probe = f.get_tensor("probe").float() if "probe" in f.keys() else None
            return F.normalize(f.get_tensor("direction").float(), dim=0), dict(f.metadata() or {}), probe
    except SafetensorError as e:  # not a safetensors file, a truncated one
        raise CheckpointMismatchError(f"{path} is not a readable .safetensors file ({e}). "
                                      f"Expected: {DIRECTION_SOURCE}") from e


@register("decomposed-clip")
class DecomposedClip(Reward):
    """S_ω = t⊥·x + ω η (v·x) (see the module docstring); `scores` are S_ω · scale, float32, differentiable.

    `direction`: a file from `save_direction`, or "batch". `fit_prompts` (used when `direction` is None): a list
    of prompts, or a prompts file / "toy:train" as `t2i_align.prompts.read_prompts` reads them.
    """

    differentiable = True
    paths = {"checkpoint": SOURCE, "direction": None}
    open_clip_checkpoint = True
    path_names = ("toy", "toy-denscore", "batch")
    option_ranges = {"omega": (0.0, 1.0, "the weight kept on the text-irrelevant part: LongAlign uses 0.3; 1 is "
                                         "plain CLIP")}

    def __init__(self, checkpoint: Optional[PathLike] = None, arch: Optional[Arch] = None, omega: float = 0.3,
                 direction: Optional[PathLike] = None, fit_prompts: Union[str, Sequence[str], None] = None,
                 split: bool = True, scale: float = 1.0, device=None, dtype=None, batch_size: int = 32):
        self.omega, self.split, self.scale = float(omega), bool(split), float(scale)
        self.batch_direction, self._warned_one = direction == "batch", False
        if not 0.0 <= self.omega <= 1.0:  # a sign typo would reward the text-irrelevant part it is meant to damp
            raise RewardSetupError(f"decomposed-clip: omega={omega} is outside [0, 1] (the weight kept on the "
                                   "text-irrelevant part: LongAlign uses 0.3; 1 is plain CLIP)")
        if direction is not None and fit_prompts is not None:
            raise ValueError("decomposed-clip: give direction or fit_prompts, not both")
        if direction is None and fit_prompts is None and self.omega != 1.0:
            raise ValueError(NO_DIRECTION)  # before loading weights: fail fast
        self.encoder = load_open_clip(arch, checkpoint, "decomposed-clip weights", SOURCE, device=device,
                                      dtype=dtype, batch_size=batch_size)
        self.direction: Optional[torch.Tensor] = None
        self.direction_metadata: Dict[str, str] = {}
        if direction is not None and not self.batch_direction:
            self.load_direction(direction)
        elif fit_prompts is not None:
            if isinstance(fit_prompts, str):
                from t2i_align.prompts import read_prompts

                fit_prompts = read_prompts(fit_prompts, "decomposed-clip fit_prompts")
            self.fit_direction(fit_prompts)

    def text_vectors(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, List[bool]]:
        """t per prompt (mean of L2-normalised sentence embeddings) and whether any of its sentences was cut."""
        cut: List[bool] = []

        def encode(sentences: List[str]) -> torch.Tensor:
            feats, flags = self.encoder.encode_texts(sentences)
            cut.extend(flags)
            return feats

        t, owner = mean_sentence_vectors(encode, prompts, self.split)
        truncated = [False] * len(prompts)
        for i, c in zip(owner, cut):
            truncated[i] = truncated[i] or c
        return t, truncated

    def fit_direction(self, prompts: Sequence[str]) -> torch.Tensor:
        """Fit v once from a prompt set (see `fit_common_direction`), keep it and use it from now on."""
        prompts = list(prompts)
        self.direction = fit_common_direction(lambda ps: self.text_vectors(ps)[0], prompts)
        self.direction_metadata = {"num_prompts": str(len(prompts)), "prompts_sha256": prompts_digest(prompts),
                                   "split": str(self.split)}
        return self.direction

    def save_direction(self, path: PathLike) -> None:
        """Write v (and how it was fitted) as safetensors; save it with the run so resumes and other processes
        load the very same vector."""
        if self.direction is None:
            raise ValueError("no fixed direction to save: fit one first (fit_prompts= or fit_direction)")
        save_direction(path, self.direction, self.direction_metadata, self._probe())

    def _probe(self) -> torch.Tensor:
        return self.encoder.encode_texts([PROBE_TEXT])[0][0].float().cpu()

    def load_direction(self, path: PathLike) -> torch.Tensor:
        v, meta, saved_probe = _read_direction(path)
        probe = self._probe()
        if v.shape != probe.shape:
            raise ValueError(f"common direction in {path} has shape {tuple(v.shape)}; this model's embeddings are "
                             f"{probe.shape[-1]}-d (was it fitted with another CLIP?)")
        if saved_probe is not None and F.cosine_similarity(saved_probe, probe, dim=0) < PROBE_MIN_COSINE:
            cos = float(F.cosine_similarity(saved_probe, probe, dim=0))
            raise ValueError(f"common direction in {path} was fitted with another text encoder (its fingerprint "
                             f"embedding has cosine {cos:.3f} with this one's): refit it with this checkpoint, or "
                             "load the checkpoint it was fitted with")
        if meta.get("split", str(self.split)) != str(self.split):
            raise ValueError(f"common direction in {path} was fitted with split={meta['split']}, this reward has "
                             f"split={self.split}: the text vectors t differ; refit or change split")
        self.direction, self.direction_metadata = v.to(self.encoder.device), meta
        return self.direction

    def score(self, images, prompts: List[str]) -> RewardOutput:
        if self.batch_direction and len(set(prompts)) < 2 and not self._warned_one:  # hours into a run: no raise
            warnings.warn(BATCH_OF_ONE + " (said once)")
            self._warned_one = True
        t, truncated = self.text_vectors(prompts)
        x = self.encoder.encode_images(images)
        if self.direction is None and not self.batch_direction:
            if self.omega != 1.0:
                raise ValueError(NO_DIRECTION)
            dtype = exact_dtype(x.device)
            total = (t.to(dtype) * x.to(dtype)).sum(-1) * self.scale  # S_1 = S needs no direction
            return total.float(), {"total": total.detach().float().tolist(), "truncated": sum(truncated),
                                   "direction": "none", "omega": self.omega}
        v = F.normalize(t.mean(0), dim=0) if self.batch_direction else self.direction
        parts = decompose(t, v, x, self.omega)
        info = {k: (parts[k] * (1.0 if k == "eta" else self.scale)).detach().float().tolist()
                for k in ("total", "relevant", "irrelevant", "weighted", "eta")}
        info.update(truncated=sum(truncated), direction="batch" if self.batch_direction else "fixed",
                    omega=self.omega)
        return (self.scale * parts["weighted"]).float(), info
