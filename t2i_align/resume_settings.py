"""What a resume may change: the settings a checkpoint was written with (its config.yaml), those a resume does not
apply (`NOT_APPLIED`), those it must keep (`check_same_model`), and the command that exports a checkpoint."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from .checkpoints import CheckpointMismatch, read_marker


def checkpoint_config(resume: Path) -> Tuple[Optional[Path], Optional[dict]]:
    """(path, settings) of the config.yaml a checkpoint was written with: its own copy first (output_dir's is the
    latest invocation's); None for one that does not read as a config (another tool's file: not to stop a run)."""
    # a run folder's (output_dir/checkpoints/step-N), not whatever lies two folders up from a copied checkpoint
    places = (resume, resume.parent) + ((resume.parent.parent,) if resume.parent.name == "checkpoints" else ())
    earlier = next((f / "config.yaml" for f in places if (f / "config.yaml").is_file()), None)
    try:
        before = yaml.safe_load(earlier.read_text()) if earlier is not None else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        before = None
    return earlier, before if isinstance(before, dict) else None


def export_hint(checkpoint: Path) -> str:
    """What to do with a training checkpoint given as LoRA weights: resume it at its own step (nothing is trained)
    into another output_dir, whose final/ is the export."""
    return (f"{checkpoint} is a training checkpoint (optimizer and random states), not an export: export it first "
            f"with {_export_command(checkpoint)} (under the accelerate config that wrote it; no step is trained), then "
            "sample OUT/final (as --lora, or as --model for a full fine-tune)")


def _export_command(checkpoint: Path) -> str:
    """The command that resumes `checkpoint` at its own step into OUT, whose final/ is then its export."""
    step = _marker_step(checkpoint) or "ITS_STEP"
    config = checkpoint_config(checkpoint)[0] or "ITS_RUN_CONFIG.yaml"
    return f"`python train/train.py --config {config} train.resume={checkpoint} train.max_steps={step} output_dir=OUT`"


def setting(data: Optional[dict], name: str):
    """data["section"]["key"] for "section.key"; None where missing."""
    for part in name.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


_GROUPS = "the checkpoint's optimizer keeps its own"
NOT_APPLIED = {"train.learning_rate": "the checkpoint's optimizer keeps its rate", "train.scale_lr": _GROUPS + " rate",
               "train.weight_decay": _GROUPS, "train.adam_beta1": _GROUPS, "train.adam_beta2": _GROUPS,
               "train.adam_epsilon": _GROUPS, "train.optimizer": _GROUPS + " (AdamW's fused flag too)"}
"""Settings a resume does not apply: torch's Optimizer.load_state_dict restores each group's saved values, as in
diffusers' scripts (a resume with another optimizer is refused: `_check_training`)."""


FIXED = ("seed", "model.family", "model.variant", "model.revision", "model.text_encoding", "lora.alpha",
         "data.kind", "data.resolution")
"""Settings a resume must keep: they change what the checkpoint's weights compute (the LoRA scale alpha/rank, the
base, the text encoding, the resolution they learned) or where its data position points (seed: the epoch's order).
LoRA on or off, its rank and targets, PPD's branch: `check_checkpoint_fits` refuses them by the weights' shapes."""
FOLDERS = ("model.pretrained", "model.vae", "data.path")
"""Also kept, unless the checkpoint's folder is gone (moved: a resume names its new place)."""
_ABSENT = object()
_ANY = object()
"""A value that says nothing of the model (`_effective`): it matches any."""


def check_same_model(path: Path, now: dict, warn: bool = True) -> None:
    """Refuse a resume that changes a FIXED setting, or names another existing folder for one of FOLDERS: before,
    adapters trained on one base loaded onto another (strict=False) with one info line. Keys a checkpoint's
    config.yaml predates are not compared, nor values that compute the same (`_effective`). `warn`: of a
    rebuilt learning-rate schedule (`_warn_schedule`)."""
    earlier, before = checkpoint_config(path)
    if before is None:
        return
    if warn:
        _warn_schedule(path, before, now)
    changed = [_shown(name, before, now) for name in FIXED + FOLDERS if _found(before, name) is not _ABSENT
               and _differs(name, _effective(name, before), _effective(name, now))]
    if changed:
        raise CheckpointMismatch(f"train.resume: {path} was trained with {', '.join(changed)} ({earlier}): resume "
                                 f"with its values. To go on from its weights with other ones, export it with "
                                 f"{_export_command(path)} (no step is trained), merge a LoRA export "
                                 "(train/merge_lora.py), and give that folder as model.pretrained to a fresh run")


def _effective(name: str, settings: dict):
    """What setting `name` computes with: LoRA's alpha as the scale alpha / rank (None: 1; nothing without LoRA; a
    new rank alone is `check_checkpoint_fits`'s, by the weights' shapes), a text
    encoding's token budget counts under "segments" only, family "auto" and a revision of a local folder say
    nothing (_ANY)."""
    value = setting(settings, name)
    if name == "lora.alpha":
        lora = setting(settings, "lora") or {}
        if not lora.get("enabled", True):
            return _ANY
        return 1.0 if value is None else float(value) / float(lora.get("rank") or 1)
    if name == "model.text_encoding" and isinstance(value, dict) and value.get("kind") != "segments":
        return {k: v for k, v in value.items() if k != "token_budget"}
    if name == "model.family" and value == "auto":
        return _ANY
    if name == "model.revision" and _where(str(setting(settings, "model.pretrained") or "")).exists():
        return _ANY
    return value


def _shown(name: str, before: dict, now: dict) -> str:
    """"name=old (now new)"; LoRA's alpha as the scale alpha / rank (a rank changed with alpha kept changes it)."""
    if name == "lora.alpha":
        return f"lora.alpha / lora.rank = {_effective(name, before):g} (now {_effective(name, now):g})"
    return f"{name}={setting(before, name)!r} (now {setting(now, name)!r})"


def _warn_schedule(path: Path, before: dict, now: dict) -> None:
    """A decaying schedule is rebuilt for the new train.max_steps (diffusers' lambdas are not saved): extending a
    linear run that ended at rate 0 goes on at half the peak rate. Not for an export (max_steps at the
    checkpoint's step: nothing is trained)."""
    steps, schedule = (setting(before, "train.max_steps"), setting(now, "train.max_steps")), \
        setting(now, "train.lr_scheduler")
    exporting = steps[1] == _marker_step(path)
    if steps[0] is not None and steps[0] != steps[1] and schedule not in ("constant", "constant_with_warmup") \
            and not exporting:
        warnings.warn(f"train.resume: {path} was trained towards train.max_steps={steps[0]}; its {schedule} "
                      f"learning-rate schedule is rebuilt for {steps[1]}, so the rate jumps to where that schedule "
                      "is at this step (resume with the old max_steps to keep its decay)", stacklevel=2)


def _found(data: Optional[dict], name: str):
    """data["section"]["key"] for "section.key", or _ABSENT."""
    for part in name.split("."):
        data = data.get(part, _ABSENT) if isinstance(data, dict) else _ABSENT
    return data


def _marker_step(path: Path) -> Optional[int]:
    try:
        return int(read_marker(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _differs(name: str, old, new) -> bool:
    """Whether a resume's `new` value of setting `name` is not the checkpoint's `old` one (_ANY matches any).
    FOLDERS: "toy" is the toy's folder; a recorded folder that is gone matches any (moved), an existing one only
    itself."""
    if old is _ANY or new is _ANY:
        return False
    if old == new or name not in FOLDERS or not old or not new:
        return old != new
    old_path, new_path = (_where(str(v)) for v in (old, new))
    return old_path.exists() and old_path.resolve() != new_path.resolve()


def _where(value: str) -> Path:
    """The folder a model.pretrained / model.vae / data.path value names ("toy": the toy pipeline's)."""
    if value == "toy":
        from .toy.assets import pipeline_dir

        return pipeline_dir()
    return Path(value).expanduser()


def changed_settings(before: dict, now: dict, prefix: str = "") -> List[str]:
    """"key: old -> new" for every leaf setting that changed, but those a resume changes by nature."""
    changed = []
    for key in sorted(set(before) | set(now)):
        name, old, new = f"{prefix}{key}", before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{name}.")
        elif old != new and name not in ("train.resume", "train.max_steps", "output_dir"):
            kept = f" (not applied: {NOT_APPLIED[name]})" if name in NOT_APPLIED else ""
            changed.append(f"{name}: {old!r} -> {new!r}{kept}")
    return changed
