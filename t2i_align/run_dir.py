"""Whose files output_dir holds: a fresh start sets an earlier run's files aside (`previous-<time>/`), a resume from
an earlier step sets the abandoned timeline aside (`checkpoints/abandoned-<time>-from-step-N/`), a resume from
another folder's checkpoint brings that run's logs along. Nothing is deleted."""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from .checkpoints import FINAL_STEP_FILE, MARKER, STEP_DIR, checkpoints_dir, list_checkpoints
from .errors import UserError
from .tracking import WANDB_ID_FILE


ABANDONED_MOVED = ("gallery", "final")
"""The abandoned timeline's end, moved aside with its later checkpoints (this run makes its own); final/ last, as
its being there is what says the end is still to be set aside."""
ABANDONED_COPIED = ("metrics.jsonl", "raft_rounds.jsonl", "reward_direction.safetensors", WANDB_ID_FILE)
"""Copied: the logs whole (this run drops their lines after the resumed step), LongAlign's direction, so that a
resume from the abandoned folder finds it, and the W&B run's id (this run starts a new W&B run)."""


def set_aside_newer(output_dir: str | os.PathLike, step: int, log=print) -> Optional[Path]:
    """Resuming from step N while checkpoints after N, or a final export of a later step, exist (an abandoned
    timeline): move those, and final/ and gallery/, into `checkpoints/abandoned-<time>-from-step-N/`, with whole
    copies of the logs (`ABANDONED_COPIED`), never deleting a user's files, so keep-last-K and `resume=latest` only
    ever see this timeline. SePPO's full fine-tune snapshots taken after N go along (into its `reference_pool/`):
    this run writes its own under the same names; the earlier ones are linked there and LongAlign's direction
    copied, so a resume from the folder finds what it needs. Returns the folder (None if nothing was set aside).

    Stopped at any point (a kill, a full disk), a relaunch finishes it: the copies are made before anything moves,
    and the newer checkpoints, which say there is something to set aside, move last (the run then cuts its logs
    after N: they were copied)."""
    from .snapshots import POOL_DIR, snapshot_files

    out = Path(output_dir)
    newer = [path for s, path in list_checkpoints(out) if s > step]
    # final/ (and the gallery beside it) only when exported past step N: a run extended from the step it ended at
    # replaces its final/ as it ends
    final_past = exported_past(out, step)
    if not newer and not final_past:  # a crashed run's snapshots after N alone: redone by this run, not kept
        return None
    snapshots = snapshot_files(out)
    later = [path for s, path in snapshots.items() if s > step]
    import time

    aside = _new_folder(checkpoints_dir(out), f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-step-{step}")
    for name in ABANDONED_COPIED:
        if (out / name).is_file():
            shutil.copyfile(out / name, aside / name)
    for s, path in snapshots.items():  # earlier ones are linked (no space) for a resume from the folder
        (aside / POOL_DIR).mkdir(exist_ok=True)
        if s <= step:
            link_or_copy(path, aside / POOL_DIR / path.name)
    ends = [out / name for name in ABANDONED_MOVED if (out / name).exists()] if final_past else []
    for path in ends + later + newer:
        move(path, aside / (POOL_DIR if path in later else "") / path.name)
    moved = [f"{len(newer)} newer checkpoint(s)"] + [p.name for p in ends]
    log(f"resumed at step {step}: moved the abandoned run's {', '.join(moved)}"
        + (f" and {len(later)} SePPO reference snapshot(s)" if later else "") + f" to {aside} (with copies of its "
        "logs)")
    return aside


def move(src: Path, dst: Path, copy_across: bool = True) -> None:
    """A rename; across file systems (checkpoints/ a link to a scratch disk) a copy, then the source deleted, or,
    without `copy_across`, a UserError (a fresh start would copy every old checkpoint back off the scratch disk)."""
    try:
        src.rename(dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        if not copy_across:
            raise UserError(f"cannot set {src} aside into {dst.parent}: they are on different file systems (is "
                            "checkpoints/ a link to another disk?); move the earlier run's files away yourself, or "
                            "use a new output_dir") from err
        shutil.move(str(src), str(dst))


def exported_past(out: Path, step: int) -> bool:
    """Whether output_dir's final/ was exported at a step after `step` (a resume from it abandons that export)."""
    return (out / "final").exists() and _final_step(out) > step


def _final_step(out: Path) -> int:
    """The step final/ was exported at: its record, or for an export without one the last step logged."""
    try:
        return int(json.loads((out / "final" / FINAL_STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return _last_logged_step(out)


def _last_logged_step(out: Path) -> int:
    """The last step in metrics.jsonl (0 when there is none)."""
    steps = [0]
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError, TypeError):
                continue  # a torn last line
    return max(steps)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no space taken: SePPO snapshots are whole UNets), or a copy where the file
    system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _new_folder(parent: Path, name: str) -> Path:
    """parent/name made, or parent/name-2, -3 ... when a folder set aside in the same second has the name."""
    for n in itertools.count(1):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue


PREVIOUS_RUN = ("metrics.jsonl", "raft_rounds.jsonl", "reference_pool", "reward_direction.safetensors", "final",
                "gallery", "config.yaml", WANDB_ID_FILE)
"""What a run leaves in output_dir besides its checkpoints: a later run there would read or append to the first
four (LongAlign's direction, fitted by another run, perhaps with another reward) and replace the others."""


SETTING_ASIDE = ".setting-aside"
"""In a previous-* folder while files are moved into it: a set-aside a kill stopped is finished there."""


def _unfinished_aside(out: Path, old: list) -> Optional[Path]:
    """The previous-* folder a killed set-aside left unfinished, when none of `old` would replace a file in it
    (the relaunch moved the rest into a second folder, splitting one run in two)."""
    return next((f for f in sorted(out.glob("previous-*")) if (f / SETTING_ASIDE).exists()
                 and not any((f / p.name).exists() for p in old)), None)


def set_aside_previous_run(output_dir: str | os.PathLike, log=print, why: str = "",
                           resume: Optional[Path] = None) -> Optional[Path]:
    """A fresh start in an output_dir holding an earlier run's checkpoints or logs: move them into
    `previous-<time>/`, never deleting them, so that `resume=latest` cannot pick up the earlier run's checkpoints,
    SePPO does not take its snapshots, and metrics.jsonl holds one run (before, a rerun appended to it). final/,
    gallery/ and config.yaml go too: a rerun replaced them (as diffusers' training scripts do), losing the
    earlier model; so do its abandoned timelines, but the one holding `resume`. `why`: what the log line says
    started it (default: a fresh start)."""
    out = Path(output_dir)
    abandoned = [p for p in sorted(checkpoints_dir(out).glob("abandoned-*"))
                 if resume is None or not resume.resolve().is_relative_to(p.resolve())]
    old = [path for _, path in list_checkpoints(out)] + abandoned + [out / name for name in PREVIOUS_RUN
                                                                     if (out / name).exists()]
    old += sorted(out.glob("final-kept-*"))  # earlier exports holding files added to them (`_keep_added`)
    unfinished = _unfinished_aside(out, old) if old else None
    if not old or (unfinished is None and [p.name for p in old] == ["config.yaml"]):  # a run stopped before its
        return None  # first step (its model did not load ...): nothing to keep, a previous-* folder each time

    import time

    aside = unfinished or _new_folder(out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    (aside / SETTING_ASIDE).touch()
    for path in old:
        move(path, aside / path.name, copy_across=False)
    (aside / SETTING_ASIDE).unlink()
    steps = [int(m.group(1)) for m in (STEP_DIR.match(p.name) for p in old) if m]
    log(f"{why or f'a fresh start in {out}'}: moved the earlier run's {', '.join(p.name for p in old)} to {aside}"
        + (f" (to continue that run instead: train.resume={aside}/step-{max(steps)})" if steps else ""))
    return aside


CARRIED = ("metrics.jsonl", "raft_rounds.jsonl", "reference_pool", "reward_direction.safetensors")
"""What a resume from a checkpoint of another folder copies from that run beside its weights."""


def prepare_run_dir(output_dir: str | os.PathLike, resume: Optional[Path], asked: Optional[str], log=print) -> None:
    """Main process, once every setting has been checked: make `output_dir` hold this run alone. A fresh start
    sets an earlier run's files aside; so does a resume from a checkpoint of another folder (a `previous-*` one,
    another run's), whose logs, SePPO snapshots and LongAlign direction (`CARRIED`) are then copied over (the
    resume drops what came after its step, as for this folder's own). `asked`: train.resume as given ("latest"
    finding no checkpoint is said, with where an earlier one went)."""
    from .snapshots import restore_snapshots

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # this folder's own timeline (a checkpoint there may link to an archive, a resume path link to one there): the
    # loop sets later ones aside
    own = checkpoints_dir(out).resolve()
    if resume is not None and own in (Path(os.path.abspath(resume)).parent.resolve(), resume.resolve().parent):
        restore_snapshots(resume, out)
        return
    if asked == "latest" and resume is None:
        log(f"train.resume=latest: no complete checkpoint in {checkpoints_dir(out)}, so this run starts fresh"
            + _newest_aside_hint(out))
    outside = f"a resume from {resume}, outside {checkpoints_dir(out)}" if resume is not None else ""
    set_aside_previous_run(out, log, why=outside, resume=resume)
    for name in CARRIED if resume is not None else ():
        # beside the checkpoint (a previous-* folder holds both) or in its run's folder (run/checkpoints/step-N)
        origin = next((f / name for f in (resume.parent, resume.parent.parent) if (f / name).exists()), None)
        if origin is not None and origin.is_dir():
            shutil.copytree(origin, out / name, copy_function=link_or_copy)
        elif origin is not None:
            shutil.copyfile(origin, out / name)
    if resume is not None:
        restore_snapshots(resume, out)



def _newest_aside_hint(out: Path) -> str:
    """" (the newest set-aside checkpoint: train.resume=...)" or ""."""
    found = [(p.parent.name, int(m.group(1)), p) for p in out.glob("previous-*/step-*")
             if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]  # folders are named by time
    return f" (the newest earlier checkpoint was set aside: train.resume={max(found)[2]})" if found else ""


LOCK_FILE = ".t2i-align.lock"
"""In output_dir: locked (flock) by the run that uses it, and naming it."""


def take_output_lock(out: Path) -> Optional[int]:
    """Main process, at start: lock output_dir for this run (the descriptor to close at its end), or UserError if
    another run holds it: two launches on one folder (a job requeued while it still ran) set each other's
    checkpoints aside and deleted each other's unfinished checkpoint and export."""
    from .files import take_lock

    out.mkdir(parents=True, exist_ok=True)
    return take_lock(out / LOCK_FILE, f"output_dir {out}", "give another output_dir")
