"""One reward interface: `reward(images, prompts) -> (scores, info)`, looked up by name (ddpo-pytorch style).

Images: PIL (any mode, any size), numpy HWC arrays, or a float tensor [B, 3, H, W] in [0, 1]. Scores: float32
[B] on the reward's device. `info`: per-image extras as plain lists, or counts (`truncated`: prompts the text
encoder had to cut). `differentiable = True` rewards keep the graph when the image tensor requires grad;
everything else is scored under `torch.no_grad()`.

Shared pieces: image preprocessing as torch ops (differentiable for tensors), batching, device / dtype
options, and checkpoint loading that only unpickles with `weights_only=True` and lists key mismatches.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from t2i_align.errors import UserError, load_refusal

# the registry lives in registry.py; rewards and callers import it from here
from .registry import (_REGISTRY, _load_builtin, available_rewards, differentiable_rewards,  # noqa: F401
                       get_reward, register)

RewardOutput = Tuple[torch.Tensor, Dict[str, Any]]
PathLike = Union[str, Path]


class PromptsRejected(UserError, ValueError):
    """A reward cannot score some prompts at all (toy-judge reads only toy captions); from `check_prompts`."""


class RewardSetupError(UserError, ValueError):
    """A reward cannot be built as asked: an unknown name, a wrong option value (version, dtype, arch ...).
    Still a ValueError, which `t2i-score` turns into a usage error naming the reward."""


class Reward:
    """Base class: subclasses implement `score(images, prompts)`; `__call__` checks the inputs."""

    name: str = ""
    differentiable: bool = False
    paths: Dict[str, Optional[str]] = {}
    """Options naming the local files or folders it loads: where each comes from, or None for one it can do
    without. Checked by `check_reward`, before a run loads its model."""
    path_names: Tuple[str, ...] = ()
    """Values of those options that are names, not paths ("toy", "batch")."""
    open_clip_checkpoint: bool = False
    """Whether `checkpoint` may also be an open_clip pretrained tag ("openai": downloaded, online only)."""
    option_ranges: Dict[str, Tuple[float, float, str]] = {}
    """Number options' closed ranges and what each means, checked by `check_options` before a run loads its model."""

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise PromptsRejected (saying which prompts and what the reward reads) if this reward cannot score
        `prompts`. Callers with fixed prompts check them once at start-up, so a run stops in its first second,
        not at its first scoring an hour in. Default: any string will do."""

    def __call__(self, images, prompts: Sequence[str]) -> RewardOutput:
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = images.unsqueeze(0)
        if hasattr(images, "convert") or isinstance(prompts, str):  # a str was scored one character per image
            raise TypeError(f"reward {self.name!r} takes a list of images and a list of prompts, one per image: "
                            "wrap a single image and prompt in lists")
        n = len(images)
        empty = [i for i, im in enumerate(images) if 0 in (getattr(im, "width", 1), getattr(im, "height", 1))]
        if empty:  # a PIL image of 0 x 0 pixels: a ZeroDivisionError in the resize
            raise ValueError(f"reward {self.name!r}: image {empty[0]} is an empty image (size {images[empty[0]].size})")
        if n != len(prompts):
            raise ValueError(f"reward {self.name!r} got {n} images but {len(prompts)} prompts")
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError(f"reward {self.name!r}: prompts must be strings, got {[type(p) for p in prompts]}")
        if n == 0:
            return torch.zeros(0), {}
        # a graph only where the caller builds one (not under its no_grad) and the pixels carry gradients
        tensors = [images] if isinstance(images, torch.Tensor) else [x for x in images if isinstance(x, torch.Tensor)]
        grad = self.differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        with torch.set_grad_enabled(grad):
            return self.score(images, list(prompts))

    def score(self, images, prompts: List[str]) -> RewardOutput:
        raise NotImplementedError


# ---------------------------------------------------------------- device, dtype, batching
def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`None` means CUDA when available, else CPU. RewardSetupError for a name that is no device ("gpu") or a
    CUDA device this machine lacks (torch would fail later, at the first tensor moved there)."""
    try:
        found = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise RewardSetupError(f"device {device!r} is not a device: use cpu, cuda, cuda:1, mps ...") from err
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise RewardSetupError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use "
                               "cpu, or cuda:N with N below that")
    try:  # mps, xla ... failed after the weights had loaded (a traceback); meta holds no values at all
        usable = found.type in ("cpu", "cuda") or (found.type != "meta" and torch.empty(1, device=found).numel())
    except (RuntimeError, AssertionError):
        usable = False
    if not usable:
        raise RewardSetupError(f"device {device!r}: this machine (or this torch build) cannot compute on "
                               f"{found.type}; use cpu, or cuda where there is a GPU")
    return found


def resolve_dtype(dtype: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """torch dtypes or their names ("fp32", "bf16", "float16", ...); `None` is float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    if name not in ("float32", "float16", "bfloat16"):
        raise RewardSetupError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return getattr(torch, name)


def batched(n: int, batch_size: int) -> List[slice]:
    """Consecutive slices covering range(n), each at most batch_size long."""
    step = max(1, int(batch_size))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


# ---------------------------------------------------------------- images
def _pil_to_tensor(image) -> torch.Tensor:
    from t2i_align.data.images import grey_to_8bit

    arr = np.asarray(grey_to_8bit(image).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _numpy_chw(im: np.ndarray) -> torch.Tensor:
    """A channels-last HxW / HxWxC array as a [C, H, W] tensor: uint8 kept, uint16 by 65535, other integers by
    255 (an int64 array of 0..255 pixels), floats as they are ([0, 1])."""
    if im.ndim not in (2, 3) or (im.ndim == 3 and im.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"numpy images are channels-last HxW or HxWxC with C = 1, 3 or 4; got shape {im.shape}")
    arr = im if im.ndim == 3 else im[..., None]
    if arr.dtype != np.uint8 and np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    return torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1)  # a copy: inputs may be read-only


def _as_chw(x: torch.Tensor) -> torch.Tensor:
    """[C, H, W] or [B, C, H, W] with C in {1, 3, 4} -> float RGB in [0, 1] (alpha dropped, grey repeated)."""
    if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3, 4):
        raise ValueError(f"image tensors are channels-first [C, H, W] or [B, C, H, W] with C = 1, 3 or 4; got shape "
                         f"{tuple(x.shape)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"empty image of shape {tuple(x.shape)}")
    x = to_unit_float(x)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x[..., :3, :, :]


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """Integer pixels (8-bit, or 16-bit in a uint16 tensor) -> float in [0, 1]; float ones range-checked."""
    if not torch.is_floating_point(x):
        return x.float() / (65535.0 if x.dtype == getattr(torch, "uint16", None) else 255.0)
    return check_image_range(x)


def one_image(im: torch.Tensor) -> torch.Tensor:
    """A list element's tensor, [C, H, W] or [1, C, H, W], as [C, H, W]; a batch in one element is refused."""
    if im.dim() == 4 and im.shape[0] != 1:
        raise ValueError(f"a list of images holds one image per element; one holds {im.shape[0]} (shape "
                         f"{tuple(im.shape)}): pass that batch as the tensor itself, or split it")
    return im[0] if im.dim() == 4 else im


def check_image_range(x: torch.Tensor) -> torch.Tensor:
    """Float images are read as [0, 1]: a warning for ones far outside (VAE output in [-1, 1], [0, 255] values),
    which would score as garbage; a decoder's small overshoot passes."""
    low, high = float(x.detach().min()), float(x.detach().max())
    if low < -0.25 or high > 1.25:
        warnings.warn(f"float images are read as RGB in [0, 1], but these span [{low:.3g}, {high:.3g}]: map them "
                      "there first (x / 2 + 0.5 for [-1, 1], x / 255 for [0, 255])", stacklevel=5)
    return x


def to_image_tensors(images) -> Union[torch.Tensor, List[torch.Tensor]]:
    """A [B, 3, H, W] tensor stays one tensor; a list of PIL / numpy HWC / [C, H, W] tensors becomes a list (a
    [1, C, H, W] element is one image; a larger batch in one element is refused: one score per image)."""
    if isinstance(images, torch.Tensor):
        return _as_chw(images.unsqueeze(0) if images.dim() == 3 else images)
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.append(_as_chw(one_image(im)))
        elif isinstance(im, np.ndarray):
            out.append(_as_chw(_numpy_chw(im)))
        elif hasattr(im, "convert"):
            out.append(_pil_to_tensor(im))
        else:
            raise TypeError(f"unsupported image type {type(im).__name__}; use PIL images or tensors")
    return out


def resize_center_crop(x: torch.Tensor, size: int, interpolation: str = "bicubic", floor_offset: bool = False,
                       shortest_edge: Optional[int] = None) -> torch.Tensor:
    """torchvision's Resize(size) (shortest side) + CenterCrop(size) as differentiable ops on [B, C, H, W];
    antialiased like PIL when shrinking, not clamped, so gradients reach every pixel. `floor_offset`: the crop
    starts at (n - size) // 2 as transformers' CLIP image processors (PickScore's); torchvision rounds half to
    even, one pixel further when n - size ≡ 3 (mod 4), e.g. 832 x 1216 -> 224 x 327. `shortest_edge`: resize the
    short side to this instead of `size` (a processor resizing to 256 and cropping 224)."""
    h, w = x.shape[-2:]
    edge = size if shortest_edge is None else shortest_edge
    nh, nw = (edge, int(edge * w / h)) if h <= w else (int(edge * h / w), edge)
    if (nh, nw) != (h, w):
        aa = interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=aa,
                          **({"align_corners": False} if aa else {}))
    offset = (lambda n: (n - size) // 2) if floor_offset else (lambda n: int(round((n - size) / 2.0)))
    top, left = offset(nh), offset(nw)
    return x[..., top:top + size, left:left + size]


Resize = Callable[[torch.Tensor, int, str], torch.Tensor]
"""(images [B, C, H, W] in [0, 1], size, interpolation) -> [B, C, size, size], applied before normalisation."""


def preprocess_images(images, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                      dtype: torch.dtype = torch.float32, interpolation: str = "bicubic",
                      resize: Resize = resize_center_crop) -> torch.Tensor:
    """PIL / tensor images -> resized to size x size by `resize` (default: shortest side + centre crop),
    normalised, [B, 3, size, size] on `device` in `dtype`."""
    # resized in float32: half-precision resampling fails on CPU, rounds on GPU
    if isinstance(images, torch.Tensor):
        x = resize(to_image_tensors(images).to(device, torch.float32), size, interpolation)
    else:  # one image at a time: a batch of large photos is never all in float at full size
        x = torch.cat([resize(to_image_tensors([im])[0].to(device, torch.float32)[None], size, interpolation)
                       for im in images])
    m, s = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return ((x.float() - m) / s).to(dtype)


# ---------------------------------------------------------------- checkpoints
class WeightsNotFoundError(UserError, FileNotFoundError):
    """A reward's weights are not where they were said to be; the message names the file and its source."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint does not fit the architecture it is loaded into (a wrong file or `arch`); the message lists
    the keys."""


def require_path(path: Optional[PathLike], what: str, source: str) -> Path:
    """Return `path` as a Path if it exists, else raise naming the file expected and where it comes from."""
    if path is None or not Path(path).exists():
        where = "no path was given" if path is None else f"{path} does not exist"
        raise WeightsNotFoundError(f"{what}: {where}. Expected: {source}")
    return Path(path)


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                 "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.safetensors.index.json")


def find_weights_file(folder: Path) -> Optional[Path]:
    return next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors from .safetensors, or .pt/.pth/.bin via `torch.load(weights_only=True)`, or a shard index;
    a `{"state_dict": ...}` wrapper (HPSv2, Lightning) is unwrapped and a DDP `module.` prefix removed."""
    path = Path(path)
    if path.is_dir():
        found = find_weights_file(path)
        if found is None:
            raise WeightsNotFoundError(f"no weights file in {path}; looked for {', '.join(_WEIGHT_FILES)}")
        path = found
    if path.name.endswith(".index.json"):
        return {k: v for s in _shards(path) for k, v in load_state_dict_file(s).items()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as e:  # a truncated download, or not a safetensors file at all
            raise CheckpointMismatchError(f"{path} is not a readable .safetensors file ({e}): download it again") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickled code objects, TorchScript archives, ...
            raise CheckpointMismatchError(
                f"{path} cannot be read as plain tensors with torch.load(weights_only=True) ({load_refusal(e)}). "
                "Re-save it as a state_dict (or .safetensors) of tensors.") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_json_file(path: Path, needs: Sequence[str] = ()) -> Dict[str, Any]:
    """A weights folder's JSON file as a dict; CheckpointMismatchError naming it when it is not JSON (a truncated
    download) or lacks a key of `needs` (a file of another format)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointMismatchError(f"{path} is not a readable JSON file ({e}): download it again") from e
    lacking = [k for k in needs if k not in data] if isinstance(data, dict) else list(needs)
    if not isinstance(data, dict) or lacking:
        raise CheckpointMismatchError(f"{path} holds no {', '.join(map(repr, lacking)) or 'JSON object'}: not the "
                                      "file this reward reads; download it again")
    return data


def _shards(index: Path) -> List[Path]:
    """The shard files a .safetensors/.bin index names, each a weights file inside the index's folder."""
    shards = sorted(set(map(str, read_json_file(index, ["weight_map"])["weight_map"].values())))
    for name in shards:  # the name as written: a hub cache's shards are links into its blobs/, resolved elsewhere
        if Path(name).is_absolute() or ".." in Path(name).parts or name.endswith(".index.json") or "\0" in name:
            raise CheckpointMismatchError(f"{index} names shard {name!r}, which is not a weights file in its folder")
    return [index.parent / name for name in shards]


def check_tokenizer_vocabulary(tokenizer, what: str, fix: str) -> None:
    """transformers builds a tokenizer of special tokens only from a folder or cache entry without vocabulary files,
    without an error: every word of a prompt is then unknown and the scores ignore the prompt."""
    ids = tokenizer("a photo of a cat", add_special_tokens=False)["input_ids"]
    if set(ids) <= set(tokenizer.all_special_ids):
        raise WeightsNotFoundError(f"{what}: the tokenizer has no vocabulary ({len(tokenizer)} tokens, every word "
                                   f"unknown: its vocabulary files are missing); {fix}")


def _listing(title: str, items: List[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


@contextmanager
def without_random_init() -> Iterator[None]:
    """Build a model whose every weight is loaded right after (`load_checked` refuses a checkpoint that misses one)
    without drawing its random initial weights (seconds per billion parameters on a CPU): transformers'
    `no_init_weights`, which also stubs torch.nn.init. Buffers computed in __init__ (attention masks, position
    ids) are not init calls and come out as usual."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.x
    with no_init_weights():
        yield


def load_checked(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state)`, but a mismatch raises CheckpointMismatchError listing the keys."""
    own = module.state_dict()
    for key in [k for k in state if k.endswith("position_ids") and k not in own]:
        del state[key]  # an index buffer that transformers < 4.31 saved (PickScore_v1 has it), not a weight
    for key in ("logit_scale", "logit_bias"):  # scalar vs [1] differs between releases
        if key in state and key in own and state[key].numel() == own[key].numel():
            state[key] = state[key].reshape(own[key].shape)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit {type(module).__name__} (wrong architecture?):"
            + (_listing("missing keys", missing) if missing else "")
            + (_listing("unexpected keys", unexpected) if unexpected else "")
            + (_listing("shape mismatches (checkpoint vs model)", shapes) if shapes else ""))
    module.load_state_dict(state, strict=True)
