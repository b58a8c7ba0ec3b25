"""Where a model comes from: `model.pretrained` ("toy", a local diffusers folder, or a hub id fetched or found in
the cache), checked before any weight loads (model_index.json, each loaded component's subfolder and weights), so
that a typo'd path, a single-file checkpoint or a partial copy fails in the dry run with what to do."""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from t2i_align.errors import UserError
from t2i_align.files import browser_leftover
from t2i_align.weight_files import missing_shard


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded or configured; the message says what to change."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
# The components the loop loads; a partial copy lacking one fails in the dry run, not after minutes of loading.
_LOADED_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_WEIGHTED_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _is_hub_id(name: str) -> bool:
    """"org/repo" and not a local-looking path: a weights file name, or one under a folder that exists here
    (`data/sd15` with a data/ folder is a typo'd path, not a repo)."""
    if not _HUB_ID.match(name) or name.lower().endswith(_WEIGHT_SUFFIXES):
        return False
    return not Path(name.split("/")[0]).is_dir()


def _single_file_hint(name: str, key: str) -> str:
    """How to convert a single-file checkpoint (`config=` a local folder of its kind, else fetched from the hub)."""
    if not name.lower().endswith(_WEIGHT_SUFFIXES):
        return ""
    owner = next((p for p in Path(name).parents[:2] if (p / "model_index.json").is_file()), None)  # pipe/unet/x
    if owner is not None:
        return f" It is a file of the pipeline folder {owner}: give that folder."
    vae, xl = key in ("model.vae", "--vae"), "xl" in Path(name).name.lower()  # sd_xl_base_1.0.safetensors
    cls, kind = ("AutoencoderKL", "VAE") if vae else ("StableDiffusionXLPipeline", "SDXL pipeline") if xl else \
        ("StableDiffusionPipeline", "SD1.5 pipeline")
    more = "" if vae or xl else " (StableDiffusionXLPipeline and an SDXL folder for SDXL)"
    return (" It names a single-file checkpoint; convert it to a diffusers folder once: `python -c \"from diffusers "
            f"import {cls} as P; P.from_single_file('{name}', config='A_LOCAL_{kind.split()[0]}_FOLDER')"
            f".save_pretrained('DIR')\"` with config a local diffusers {kind} folder{more}, then give DIR.")


def _pass_local(key: str = "model.pretrained") -> str:
    pipeline = key in ("model.pretrained", "--model", "--base-model")
    what = "diffusers pipeline folder (the one holding model_index.json)" if pipeline else "folder"
    return f"pass a local {what}: {key}{' ' if key.startswith('--') else '='}/path/to/folder"


def _is_unet_folder(folder: Path) -> bool:
    try:
        return "UNet" in json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return False


def read_index(path: Path, key: str = "model.pretrained") -> dict:
    """model_index.json of pipeline folder `path` (given as `key`); ModelLoadError when missing or damaged."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        lora = (Path(path) / "pytorch_lora_weights.safetensors").is_file()
        hint = " (it holds LoRA weights: give it as the LoRA, and the base model here)" if lora else ""
        others = any((Path(path) / part).is_dir() for part in ("vae", "text_encoder", "text_encoder_2"))
        if (Path(path).parent / "model_index.json").is_file():  # its unet/ (or other part) given for the pipeline
            hint = f" (it is the {Path(path).name}/ of the pipeline folder {Path(path).parent}: give that folder)"
        elif not others and (_is_unet_folder(Path(path)) or _is_unet_folder(Path(path) / "unet")):  # DPO's
            hint = (" (it holds a UNet only: merge it into its base model first, python train/merge_lora.py --model "
                    f"BASE --unet {path} --out DIR, and give DIR)")
        raise ModelLoadError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder{hint}; "
                             f"{_pass_local(key)}")
    try:
        return json.loads(index_file.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{index_file} is not valid JSON ({err}): the folder is damaged; download it again") \
            from None


def _check_parts(path: Path, index: dict, skip: Sequence[str] = (), variant: Optional[str] = None) -> None:
    """Each component the loop loads has its subfolder, and the models their weights (a partial download);
    `skip`: those the run takes from elsewhere (the VAE with model.vae)."""
    for name in _LOADED_PARTS:
        if name in skip:
            continue
        entry = index.get(name)
        if not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        if (missing := missing_files(path / name, name, variant)) is None:
            continue
        other = ", or decode with another VAE (model.vae=DIR; sample/ and merge_lora.py: --vae DIR)" * (name == "vae")
        raise ModelLoadError(f"{path}/model_index.json lists the {name} component but {missing}: the folder is "
                             f"incomplete (a partial download or copy?); download or copy it again{other}")


def missing_files(sub: Path, name: str, variant: Optional[str] = None) -> Optional[str]:
    """What component folder `sub` lacks, or None. A tokenizer without its vocabulary loaded as a 2-token one
    (transformers 5), every prompt encoded alike; a missing config.json gave a default model and a size mismatch."""
    if not sub.is_dir():
        return f"{sub} is missing"
    has = {f.name for f in sub.iterdir()}
    weights = [f for f in sorted(has) if f.lower().endswith(_WEIGHT_SUFFIXES)]
    if name in _WEIGHTED_PARTS and not weights:
        return f"{sub} holds no weights file"
    # only when no file is real: `git lfs pull --include "*.safetensors"` leaves the .bin copies pointers
    if name in _WEIGHTED_PARTS and all(_lfs_pointer(sub / f) for f in weights):
        return (f"{sub / weights[0]} is a git-lfs pointer, not the weights (cloned without git-lfs): install "
                "git-lfs and run `git lfs pull` in the model's repository")
    if name in _WEIGHTED_PARTS and (shard := missing_shard(sub, variant, name.startswith("text_encoder"))):
        return shard
    if name in _WEIGHTED_PARTS and "config.json" not in has:
        return f"{sub} has no config.json"
    if name == "scheduler" and "scheduler_config.json" not in has:
        return f"{sub} has no scheduler_config.json"
    if name.startswith("tokenizer") and "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        return f"{sub} holds no vocabulary (tokenizer.json, or vocab.json with merges.txt)"
    return _damaged_json(sub, sorted(f for f in has if f.endswith(".json") and not browser_leftover(f)))


def _damaged_json(sub: Path, names: Sequence[str]) -> Optional[str]:
    """The first of `names` in `sub` that is not JSON (cut short, overwritten): it failed as a traceback when its
    part loaded, after the dry run passed."""
    for name in names:
        try:
            json.loads((sub / name).read_bytes())
        except (OSError, ValueError):
            return f"{sub / name} is not valid JSON (damaged or cut short)"
    return None


def _lfs_pointer(path: Path) -> bool:
    """A git-lfs pointer file (about 130 bytes of text) where the weights should be."""
    try:
        return path.stat().st_size < 1024 and path.read_bytes().startswith(b"version https://git-lfs")
    except OSError:
        return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: Optional[str], variant: Optional[str], pipeline: bool, key: str) -> Path:
    """Fetch a hub repo (or find it in the local cache when offline), failing with a how-to message."""
    offline = _hub_offline()
    try:
        if pipeline:  # DiffusionPipeline.download skips files the pipeline does not need (other variants, .ckpt)
            from diffusers import DiffusionPipeline

            folder = DiffusionPipeline.download(repo_id, revision=revision, variant=variant, local_files_only=offline)
            return Path(folder)
        from huggingface_hub import snapshot_download

        # a VAE's files, at the top or in vae/: "*.safetensors" took every file of a pipeline repo (tens of GB)
        patterns = [f"{sub}{name}" for sub in ("", "vae/") for name in ("config.json",
                                                                         "diffusion_pytorch_model*.safetensors")]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as err:  # hub errors have many types (offline, HTTP, connection); all mean the same here
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached (or has no such repo)"
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder and looks like a Hugging Face Hub id, but it is not in the local "
            f"cache and {why} ({type(err).__name__}: {str(err)[:200]}). Download it where a network exists (e.g. "
            f"`hf download {repo_id} --local-dir /path/to/folder`), copy the folder here and "
            f"{_pass_local(key)}."
        ) from err


def resolve_pretrained(
    pretrained: str,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    pipeline: bool = True,
    key: str = "model.pretrained",
    skip_parts: Sequence[str] = (),
) -> Path:
    """Turn model.pretrained ("toy", a local folder or a hub id) into a local folder.

    `pipeline=False` resolves a single-model folder (e.g. a separate VAE), which has no model_index.json;
    `key` is the config field named in error messages; a local pipeline folder's loaded components are checked
    but `skip_parts` (`_check_parts`).
    """
    if pretrained == "toy":
        from t2i_align.toy.assets import pipeline_dir

        path = pipeline_dir()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the toy pipeline is not built yet ({path}): run `python -m t2i_align.toy build`")
        return path
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if pipeline:
            _check_parts(path, read_index(path, key), skip_parts, variant)
        return path
    if path.exists():
        raise ModelLoadError(f"{key}={pretrained!r} is a file, not a folder; {_pass_local(key)}."
                             f"{_single_file_hint(pretrained, key)}")
    if not _is_hub_id(pretrained):
        org = pretrained.split("/")[0]
        shadowed = (f" (read as a local path, since ./{org} exists; for the hub id, run from another folder)"
                    if _HUB_ID.match(pretrained) and Path(org).is_dir() else "")
        raise ModelLoadError(f"{key}={pretrained!r}: no such folder{shadowed}; {_pass_local(key)}."
                             f"{_single_file_hint(pretrained, key)}")
    return _download(pretrained, revision, variant, pipeline, key)


def local_model_folder(pretrained: str, skip_parts: Sequence[str] = (), pipeline: bool = True,
                       key: str = "model.pretrained", revision: Optional[str] = None,
                       variant: Optional[str] = None) -> Optional[Path]:
    """`resolve_pretrained(pretrained, ...)` where it needs no download: "toy", a folder, and offline a hub id (its
    cached copy, or the error the run would give: the dry run passed an uncached one). Online a hub id is None."""
    if pretrained != "toy" and not Path(pretrained).expanduser().exists() and _is_hub_id(pretrained) \
            and not _hub_offline():
        return None
    return resolve_pretrained(pretrained, revision, variant, skip_parts=skip_parts, pipeline=pipeline, key=key)


def check_tuned_folder(path: Path, encoding) -> None:
    """A folder this project tuned and exported (a merge, a full export) trains as it samples: a model tuned on
    LongAlign's segments (recorded in it) is not trained on captions cut at 77 tokens or at another token budget
    (from clip77 to segments is LongAlign's own step, allowed), and has no PPD user branch beside unet/, which
    sampling attaches and training would not (a PPD run adds a fresh one; its reference, every adapter off, would
    not hold the trained one)."""
    from .conditioning.text import TEXT_ENCODING_FILE, read_text_encoding
    from .users.inference import branch_file

    if branch_file(path) is not None:
        raise ModelLoadError(f"model.pretrained {path} holds a PPD user branch (user_branch.safetensors), which its "
                             "samples use and training cannot continue: train from the model the PPD run started "
                             "from, or a copy of this folder without user_branch.safetensors")
    recorded = read_text_encoding(path)
    if recorded is None or recorded.kind != "segments" or (encoding.kind == "segments"
                                                           and encoding.token_budget == recorded.token_budget):
        return
    budget = f" ({encoding.token_budget} tokens)" if encoding.kind == "segments" else ""
    raise ModelLoadError(f"model.pretrained {path} was tuned with text encoding {recorded.kind!r} (token budget "
                         f"{recorded.token_budget}, in its {TEXT_ENCODING_FILE}) but this run encodes with "
                         f"{encoding.kind!r}{budget}: set "
                         f"model.text_encoding.kind={recorded.kind} "
                         f"model.text_encoding.token_budget={recorded.token_budget}")


def lora_load_error(lora: Path, path: Path, err: Exception) -> str:
    """One line on why diffusers could not load `lora`: a size mismatch (another model family), a LyCORIS file,
    or diffusers' own words (all of them: the detail, e.g. the keys not converted, often follows an empty line)."""
    text = str(err)
    mismatch = next((line.strip() for line in text.splitlines() if "size mismatch" in line), None)
    if mismatch:
        return (f"LoRA weights {lora} do not match the model in {path} (trained on another model, e.g. SDXL's on "
                f"SD1.5?): {mismatch[:300]}")
    if "hada_" in text or "lokr_" in text:
        return (f"LoRA weights {lora} are a LyCORIS file (LoHa / LoKr), which diffusers' load_lora_weights does "
                "not read: merge it with the tool that made it, or train a LoRA")
    detail = " ".join(text.split())[:300] or type(err).__name__
    return f"LoRA weights {lora} do not match the model in {path}: {detail}"


_DROPPED = ("was unsuccessful with the following error", "led to unexpected keys", "No LoRA keys associated to")


class _LoadErrorFilter(logging.Filter):
    """Drops diffusers' log of a failed load, which a ModelLoadError then says in one line, and its note that a text
    encoder took no keys (every UNet-only LoRA, ours included; "safe to ignore", it says), and holds its list of keys
    no layer took (with those it left missing) until `_refuse_unused` has said it in one line, or not."""
    def __init__(self):
        super().__init__()
        self.held: list = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "led to unexpected keys" in text:
            self.held.append(record)
        return not any(words in text for words in _DROPPED)


def _weights_file(lora: Path) -> Tuple[str, Dict[str, str]]:
    """(folder, {"weight_name": file}) for diffusers' load_lora_weights: before 0.40 (what transformers 4 resolves
    to) a path without `weight_name` failed under HF_HUB_OFFLINE, a file's too ("When using the offline mode, you
    must specify a `weight_name`"). A folder's file: pytorch_lora_weights.safetensors, else its only one."""
    if not lora.is_dir():
        return str(lora.parent), {"weight_name": lora.name}
    found = sorted(p.name for p in lora.glob("*.safetensors") if not p.name.startswith("."))
    name = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in found else \
        found[0] if len(found) == 1 else None
    return str(lora), {"weight_name": name} if name else {}


def load_lora(pipe, lora: Path, path: Path) -> None:
    """`pipe.load_lora_weights(lora)`, its failures one ModelLoadError line (`lora_load_error`; diffusers' own log
    of the error, a line per mismatched weight, dropped), and a file refused when any of its UNet LoRA keys found no
    UNet layer (`_refuse_unused`: peft loads the rest, diffusers only logs a warning and the samples are of part of
    the adapter)."""
    logs = [logging.getLogger(f"diffusers.{n}") for n in ("loaders.peft", "utils.peft_utils", "loaders.lora_base")]
    drop = _LoadErrorFilter()
    for log in logs:
        log.addFilter(drop)
    folder, name = _weights_file(Path(lora))
    before = set(getattr(pipe.unet, "peft_config", None) or ())
    try:
        pipe.load_lora_weights(folder, **name)
    except (ValueError, RuntimeError, KeyError, IndexError, OSError) as err:  # OSError: not a weights file
        if "not found in the base model" in str(err):  # peft: no layer of a part has any of its names
            _refuse_unused(pipe, lora, path, folder, name, _new_adapter(pipe, before))
        raise ModelLoadError(lora_load_error(lora, path, err)) from err
    finally:
        for log in logs:
            log.removeFilter(drop)
    adapter = _new_adapter(pipe, before)
    if adapter is None:
        raise ModelLoadError(f"LoRA weights {lora} do not match the model in {path}: no UNet layer took them")
    _refuse_unused(pipe, lora, path, folder, name, adapter)
    for record in drop.held:  # not refused: keys of the layers it took (missing keys too): diffusers' words stand
        logging.getLogger(record.name).handle(record)


def _new_adapter(pipe, before: set) -> Optional[str]:
    return next((a for a in getattr(pipe.unet, "peft_config", None) or () if a not in before), None)


def _refuse_unused(pipe, lora: Path, path: Path, folder: str, name: Dict[str, str], adapter: Optional[str]) -> None:
    """ModelLoadError when any of the file's LoRA keys but the text encoders' (as diffusers reads them) takes no
    layer: a UNet key (converted as diffusers does, before peft matches it by layer name) whose layer has no
    `adapter` (None: none loaded), or a key of no part (diffusers drops those silently)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = pipe.lora_state_dict(folder, unet_config=pipe.unet.config, **name)[0]
    stray = [k for k in state if not k.startswith(("unet.", "text_encoder.", "text_encoder_2."))]
    keys = {k[len("unet."):]: k for k in state if k.startswith("unet.")}
    if keys and "lora_A" not in next(iter(keys)):  # diffusers' own test (load_lora_adapter)
        keys = convert_unet_state_dict_to_peft(keys)
    keys = {k: original for k, original in keys.items() if ".lora_" in k}
    took = {n.split(".lora_")[0] for n, _ in pipe.unet.named_parameters() if adapter and f".{adapter}." in f"{n}."}
    unused = [original for k, original in keys.items() if k.split(".lora_")[0] not in took] + stray
    if unused:
        raise ModelLoadError(f"LoRA weights {lora}: {len(unused)} of its {len(keys) + len(stray)} LoRA keys outside "
                             f"the text encoders match no UNet layer in {path} (e.g. {unused[0]}): an adapter for "
                             "another base model, or with other target modules; give a LoRA trained on this model")


def check_vae_scale(path: Path, vae, key: str) -> None:
    """A VAE given in place of pipeline `path`'s own (`key`) has its latent scale: SD1.5's and SDXL's VAEs both give
    4 channels, so one of the other family passed every check and trained on latents the UNet never saw."""
    try:
        own = json.loads((Path(path) / "vae" / "config.json").read_text())
    except (OSError, ValueError):  # no VAE of its own (loaded from elsewhere): nothing to compare with
        return
    from diffusers import AutoencoderKL

    defaults = inspect.signature(AutoencoderKL.__init__).parameters  # what a config leaving a key out means
    for name in ("scaling_factor", "shift_factor"):
        theirs, ours = vae.config.get(name), own.get(name, defaults[name].default)
        if theirs != ours:
            raise ModelLoadError(f"{key}: its VAE's {name} is {theirs}, the model's own VAE's {ours}: a VAE of "
                                 "another model family (SD1.5: 0.18215, SDXL: 0.13025); give one made for this model")


TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")


def carry_tokenizer_files(source: Path, folder: Path) -> None:
    """The vocabulary files of `source`'s tokenizers that a saved pipeline `folder` lacks: transformers 5 saves a
    CLIPTokenizer as tokenizer.json alone, which transformers 4 (setup.cfg allows it) cannot load as the
    CLIPTokenizer model_index.json names. Text files, copied as they are: the tokenizers never train."""
    import shutil

    for part in ("tokenizer", "tokenizer_2"):
        if not (Path(folder) / part).is_dir():
            continue
        for name in TOKENIZER_FILES:
            src, dst = Path(source) / part / name, Path(folder) / part / name
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)


def part_class(path: Path, name: str, library: str, class_name: str):
    """The class model_index.json names for part `name`. Never code from the folder: only diffusers' and
    transformers' own classes (an Auto class with an auto_map in its config.json asked "run the custom code?" and
    ran the folder's .py on a "y"; diffusers' pipeline loading refuses custom classes too)."""
    import importlib

    # transformers' AutoModel, AutoTokenizer ... (diffusers' AutoencoderKL is a model class like any other)
    if library not in ("diffusers", "transformers") or library == "transformers" and class_name.startswith("Auto"):
        raise ModelLoadError(f"{path}/model_index.json names {library}.{class_name} for {name}: only diffusers' and "
                             "transformers' own classes are loaded (no custom or Auto classes, whose code may come "
                             "from the folder); give a standard SD1.5 / SDXL diffusers folder")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelLoadError(f"{library} has no class {class_name!r} (needed for {name}); check the installed version")
    return cls
