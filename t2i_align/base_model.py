"""The model exported adapters were trained on: recorded beside them (`write_base_model`), the default model to
sample or merge them on (`default_model`), and a warning when they are applied to another (`warn_other_base`)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

BASE_MODEL_FILE = "t2i_align_base_model.json"
"""Written beside exported adapters and into full exports (`checkpoints.export_final`) and merged folders
(`merge.merge_lora`): the model folder they were trained on or made from."""


def write_base_model(folder: Path, model_dir: Path, given: Optional[str] = None, vae_dir: Optional[Path] = None,
                     vae_given: Optional[str] = None) -> None:
    """Record the model folder (resolved), the name it was given by ("toy", a hub id, a path) and the `model.vae`
    the run encoded and decoded with instead of the folder's, if any: its folder as it loaded (resolved then: a hub
    id is not fetched again at the export) and its name."""
    from .files import write_json_atomic

    extra = {} if vae_dir is None else {"vae": str(Path(vae_dir).resolve()), "vae_given": vae_given}
    write_json_atomic(Path(folder) / BASE_MODEL_FILE, {"pretrained": str(Path(model_dir).resolve()), "given": given,
                                                      **extra})


def note_recorded_vae(lora: Path) -> None:
    """A note when adapters record a `model.vae` their run used and sampling decodes with the folder's own VAE."""
    vae = _read(lora).get("vae")
    if isinstance(vae, str):
        print(f"note: {lora} was trained with model.vae={vae}; this pipeline decodes with its folder's own VAE (pass "
              f"--vae {vae} to decode as training did)", file=sys.stderr)


def _read(lora: Path) -> dict:
    """What the adapters at `lora` (a file or its folder) record; {} without a record (older exports, other tools)."""
    try:
        kept = json.loads(((lora if lora.is_dir() else lora.parent) / BASE_MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _record(lora: Path) -> Optional[Tuple[str, Optional[str]]]:
    """(resolved folder, name given) that the adapters at `lora` record; None without one."""
    kept = _read(lora)
    folder = kept.get("pretrained")
    return (folder, kept.get("given")) if isinstance(folder, str) else None  # not our record: nothing to go by


def default_model(model: Optional[str], lora: Optional[str | Path], flag: str = "--model") -> str:
    """`model` if given; else the model `lora` records it was trained on (`write_base_model`), "toy" or its folder,
    which must be here (else a ModelLoadError says to pass `flag`); else "toy" (no LoRA, or no record)."""
    from .models import ModelLoadError

    if model is not None:
        return model
    record = _record(Path(lora)) if lora else None
    if record is None or record[1] == "toy":
        return "toy"
    folder, given = record
    if not Path(folder).is_dir():
        raise ModelLoadError(f"{lora} records it was trained on {given or folder}, which is not here ({folder}): pass "
                             f"{flag} with that model's folder")
    print(f"note: {flag} not given: {folder}, the model {lora} records it was trained on", file=sys.stderr)
    return folder


def made_from_toy(model: str) -> bool:
    """Whether `model` ("toy", a folder) is the toy model or was made from it: a full export or a merged folder
    records its base (`write_base_model`), followed back (LongAlign's stage-1 merged folder, a full fine-tune of
    the toy's final/ ...). Sampling defaults to the toy's guidance for all of them."""
    from .toy.assets import pipeline_dir

    if model == "toy":
        return True
    toy, folder, seen = pipeline_dir().resolve(), Path(model).expanduser(), set()
    while folder.is_dir() and (here := folder.resolve()) not in seen:
        if here == toy:
            return True
        seen.add(here)
        record = _record(folder)
        if record is None:
            return False
        if record[1] == "toy":
            return True
        folder = Path(record[0])
    return False


def warn_other_base(given: str, model_dir: Path, lora: Path, unet: Optional[str | Path] = None) -> None:
    """Warn when adapters recorded as trained on another model are applied to `model_dir` (named `given`): they
    then change a model they did not learn on (LongAlign's stage-2 LoRA belongs on stage 1's merged folder). The same
    folder is the same model, and so is the same name where it is no local folder ("toy", a hub id, whose folder
    differs between machines). With `unet`, a UNet checkpoint replacing the folder's (`--unet`), the model is that
    checkpoint's: the same only where they were trained on its folder (a full export of ours, or the folder it is
    the unet/ of)."""
    record = _record(lora)
    if record is None:
        return
    trained_on, name = record
    if unet is not None:
        from .unet_checkpoint import checkpoint_folders

        same = Path(trained_on).resolve() in {folder.resolve() for folder in checkpoint_folders(unet)}
    else:
        same = given == name and not Path(given).exists() or Path(trained_on).resolve() == Path(model_dir).resolve()
    if not same:
        applied = f"{model_dir} with --unet {unet}" if unet is not None else str(model_dir)
        tuned = _record(Path(trained_on)) is not None  # a merge or export of ours: LongAlign's stage-1 merge
        hint = " (it trained on a tuned folder: give that one, as stage 1's merge for LongAlign stage 2)" if tuned \
            else ""
        warnings.warn(f"{lora} was trained on {name or trained_on}, and is applied to {applied}: unless that is the "
                      f"same model, the samples are not what trained{hint}", stacklevel=2)
