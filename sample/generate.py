"""Generate images for a prompts file at fixed seeds: PNGs plus metadata.jsonl (what `t2i-score --images OUT` reads).

    python sample/generate.py --model toy --prompts toy:heldout --seeds-per-prompt 2 --out runs/samples
    python sample/generate.py --model /data/sd15 --lora runs/sd15-dpo-lora/final --prompts prompts.txt \\
        --scheduler dpm++ --steps 25 --guidance 7.5 --device cuda --out runs/sd15-samples
    python sample/generate.py --lora runs/ppd-exp/ppd/final --user 3 --out runs/user-3       # PPD: one user
    python sample/generate.py --lora runs/ppd-exp/ppd/final --user 3 --user 5 --alpha 0.25 --out runs/mix

The folder is published whole: images go to OUT.partial as they are made, which becomes OUT when every image is
there. A run that stopped (Ctrl-C, a kill, a crash) leaves OUT.partial; the same command with --resume finishes it
(each image from its own seed, as an uninterrupted run makes it). An existing non-empty --out is kept unless
--overwrite is given.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from common import (add_model_args, add_sampling_args, add_user_args, check_models, check_out_of_models, default_model,
                    encoding_record, run_cli, settings_from, user_choice_from)


MADE_BY = "t2i_align_generated.json"
"""Marks a folder generate.py wrote (metadata.jsonl alone does not: Hugging Face's imagefolder data sets have one);
it holds the run's settings, which --resume checks in OUT.partial."""
PARTIAL = ".partial"
"""OUT.partial: the images of a run not yet finished."""
LATER = ("model_files", "input_files")
"""Recorded since sessions 27 and 37: a partial started before lacks them (taken as unchanged)."""
RESIZABLE = ("batch_size",)
"""Settings a resumed run may change (a smaller batch after running out of memory): each image keeps its own
generator, so only batch-size numerics can differ (the last bits of a latent, a pixel level at most)."""

def _sample_into(out: Path, sample, meta: dict, run: dict, resume: bool = False) -> int:
    """`sample(first, on_batch)` run with each batch's PNGs and metadata lines written to OUT.partial as they come
    (not every image held in memory), from image `first` on (0, or where an interrupted run of the same `run`
    stopped, with `resume`); the folder then published whole as `out`. Returns the number of images."""
    from t2i_align.files import take_lock

    lock_path = out.with_name(f".{out.name}.lock")  # two runs on one --out filled and published each other's folder
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = take_lock(lock_path, f"--out {out}", "give another --out")
    try:
        return _sample_locked(out, sample, meta, run, resume)
    finally:
        if lock is not None:
            lock_path.unlink(missing_ok=True)
            os.close(lock)


def _sample_locked(out: Path, sample, meta: dict, run: dict, resume: bool) -> int:
    from t2i_align.files import replace_dir, write_text_atomic

    part = out.with_name(out.name + PARTIAL)
    lines = _resume_point(part, run, resume)
    try:
        if len(lines) < run["images"]:
            with open(part / "metadata.jsonl", "a", encoding="utf-8") as listing:
                sample(len(lines), lambda batch: _write_batch(part, batch, meta, lines, listing))
        write_text_atomic(part / MADE_BY, json.dumps({"images": len(lines), "finished": True, "run": run}) + "\n")
        replace_dir(part, out)
    except BaseException:
        if not lines:  # nothing to resume (a LoRA that failed to load): no folder that a rerun would have to clear
            shutil.rmtree(part, ignore_errors=True)
        elif part.exists():  # not when the failure came after publishing (removing the replaced folder)
            print(f"note: {len(lines)} of {run['images']} images are kept in {part}: the same command with --resume "
                  "finishes them", file=sys.stderr)
        raise
    return len(lines)


def _write_batch(part: Path, batch, meta: dict, lines: List[str], listing) -> None:
    """Each image's PNG, then its metadata line (a line names an image that is whole)."""
    from t2i_align.gallery import to_pil, to_uint8

    for image, prompt, seed in zip(to_uint8(batch.images), batch.prompts, batch.seeds):
        name = f"{len(lines):05d}.png"
        to_pil(image).save(part / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed, **meta}))
        listing.write(lines[-1] + "\n")
    listing.flush()


def _resume_point(part: Path, run: dict, resume: bool) -> List[str]:
    """The metadata lines of the images an interrupted run of the same `run` left in `part` (checked: the same
    settings, each image there), with `resume`; else a fresh `part` and []. A `part` it cannot continue is kept."""
    from t2i_align.errors import UserError
    from t2i_align.files import write_text_atomic

    if part.exists():
        try:
            earlier = json.loads((part / MADE_BY).read_text(encoding="utf-8"))["run"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{part} exists but is not an unfinished generate.py run (no readable {MADE_BY}): move "
                            "it away or choose another --out") from None
        lines = _whole_images(part)
        if not lines:  # killed before its first image: nothing to keep
            shutil.rmtree(part)
    if not part.exists():
        part.mkdir(parents=True)
        write_text_atomic(part / MADE_BY, json.dumps({"finished": False, "run": run}) + "\n")
        return []
    if not resume:
        raise UserError(f"{part} holds {len(lines)} images of an unfinished generate.py run: add --resume to finish "
                        f"it (same flags), or delete {part} to start again")
    now = json.loads(json.dumps(run))  # as the record reads back (tuples as lists)
    if "files_version" not in earlier:
        now = _as_recorded_before(now)
    changed = [key for key in sorted(set(now) | set(earlier))
               if key not in RESIZABLE and earlier.get(key, now[key] if key in LATER else None) != now.get(key)]
    if changed:
        raise UserError(f"--resume: {part} was started with other settings ({', '.join(changed)} differ): give its "
                        f"flags again, or delete {part} to start again")
    # whole batches only (a kill mid-batch kept part of one): the rest is made in the batches an uninterrupted run
    # makes, and so are its images, to the bit
    if len(lines) < run["images"]:  # finished (its publishing failed): every image kept
        lines = lines[:len(lines) - len(lines) % earlier.get("batch_size", 1)]
    write_text_atomic(part / "metadata.jsonl", "".join(line + "\n" for line in lines))  # without a torn last line
    return lines


def _whole_images(part: Path) -> List[str]:
    """The leading metadata lines of `part` that parse and name the next image, whose PNG is there (a kill can
    leave a torn last line, or a PNG without its line)."""
    listing, lines = part / "metadata.jsonl", []
    for line in listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []:
        try:
            name = json.loads(line)["file"]
        except (ValueError, KeyError, TypeError):
            break
        if name != f"{len(lines):05d}.png" or not (part / name).is_file() or not (part / name).stat().st_size:
            break
        lines.append(line)
    return lines


def _check_out(args) -> None:
    """Before any work: --out is a folder that can be replaced whole, and holds none of the script's inputs."""
    from t2i_align.files import check_output_path, check_replaceable_folder, given_path

    out = given_path(args.out, "--out")  # "" is no folder to replace, not the working directory
    check_replaceable_folder(out, "--out", "generate.py")
    check_out_of_models(args, ("--lora", "--model", "--unet", "--vae"))
    inputs = {"--lora": args.lora, "--model": None if args.model == "toy" else args.model,
              "--prompts": None if args.prompts.startswith("toy:") else args.prompts,
              "--user-table": args.user_table, "--user-shots": args.user_shots}
    check_output_path(out, "--out", folder=True, inputs={k: v for k, v in inputs.items() if v}, replaces=[out],
                      overwrite=args.overwrite, made_by=MADE_BY)
    added = _added_files(out)
    if added:
        from t2i_align.errors import UserError

        raise UserError(f"--out {out} holds files generate.py did not write ({', '.join(added[:3])}), which "
                         "--overwrite would delete with the folder: move them out or choose another --out")


def _added_files(out: Path) -> List[str]:
    """Files in a folder generate.py wrote that it did not write (a t2i-score --out put inside it)."""
    from t2i_align.files import browser_leftover

    if not (out / MADE_BY).is_file():
        return []
    ours, listing = {MADE_BY, "metadata.jsonl"}, out / "metadata.jsonl"
    for line in listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []:
        with contextlib.suppress(ValueError, AttributeError):  # a torn or edited line: its image counts as added
            ours.add(json.loads(line).get("file"))
    # what a file browser or notebook leaves is not the user's work; other hidden entries (.git) are
    return sorted(p.name for p in out.iterdir() if p.name not in ours and not browser_leftover(p.name))


def _as_recorded_before(run: dict) -> dict:
    """`run` as a record written before session 36 holds it: the weight files (*.safetensors) of the LoRA and of
    the model's parts only, so a partial run started then still resumes."""
    run = {k: v for k, v in run.items() if k != "files_version"}
    weights = {"lora_files": lambda name: name.endswith(".safetensors"),
               "model_files": lambda name: name.count("/") == 1 and name.endswith(".safetensors")}
    return {k: [f for f in v if weights[k](f[0])] if k in weights else v for k, v in run.items()}


def _visible_files(folder: Path, *patterns: str) -> List[Path]:
    """The files in `folder` matching `patterns`, sorted, without hidden ones (a browser's .DS_Store)."""
    return sorted(p for pattern in patterns for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def _model_folder(args) -> Path:
    """--model's folder (checked by check_models; without its vae/ where --vae replaces it)."""
    from t2i_align.model_folders import resolve_pretrained

    skip = ("vae",) if getattr(args, "vae", None) else ()
    return Path(resolve_pretrained(args.model, key="--model", skip_parts=skip))


def _run_record(meta: dict, prompts: List[str], images: int, args) -> dict:
    """What --resume checks is the same: the settings, the prompts, the weight and JSON files of the LoRA, the
    weight and config files of a local --model folder as they are now (size and time: a longer run may have
    replaced RUN/final since, a merge been redone, a scheduler config edited) and the kind of device (CPU and GPU
    numerics differ)."""
    lora = Path(args.lora) if args.lora else None
    files = [] if lora is None else _visible_files(lora, "*.safetensors", "*.json") if lora.is_dir() else [lora]
    model = _model_folder(args) if args.model else None
    parts = ("*.json", "*/*.json", "*/*.safetensors", "*/*.bin")
    weights = _visible_files(model, *parts) if model is not None and model.is_dir() else []
    return {**meta, "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "images": images,
            "device": str(args.device).split(":")[0], "files_version": 2,
            "lora_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "model_files": [[str(f.relative_to(model)), f.stat().st_size, f.stat().st_mtime_ns] for f in weights],
            "input_files": _input_files(args)}


def _input_files(args) -> List[list]:
    """[path, size, time] of the --vae folder's files and the PPD user table and shots (recorded by path alone, one
    replaced between the stop and --resume mixed old and new images without a word)."""
    given = [Path(p) for p in (getattr(args, "vae", None), getattr(args, "user_table", None),
                                getattr(args, "user_shots", None)) if p]
    found = [f for p in given for f in (_visible_files(p, "*.json", "*.safetensors", "*/*.json", "*/*.safetensors")
                                        if p.is_dir() else [p] if p.is_file() else [])]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in found]


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_user_args(p)
    p.add_argument("--out", required=True, help="output folder (PNGs + metadata.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--resume", action="store_true",
                   help="finish the images an interrupted run of the same command left in OUT.partial")
    args = p.parse_args(argv)
    default_model(args)
    from t2i_align.evaluation import sample_model
    from t2i_align.weight_files import weights_variant
    from t2i_align.prompts import read_prompts

    out = Path(args.out)
    _check_out(args)
    # named by their flags if wrong; the encoding recorded with the weights goes into metadata.jsonl
    encoding = check_models({"tuned": (args.model, args.lora, args.text_encoding)}, args.vae)["tuned"]
    args.text_encoding = encoding.kind
    prompts = read_prompts(args.prompts, "--prompts")
    settings = settings_from(args, len(prompts))
    user = user_choice_from(args)
    meta = {"model": args.model, "lora": args.lora, **encoding_record(encoding), **settings.as_dict()}
    # the weights loaded (--variant falls back to plain ones)
    meta["variant"] = weights_variant(_model_folder(args), args.variant, "--variant", fallback=True)
    if user.given:
        meta["user"] = {"ids": user.ids, "alpha": user.alpha, "table": user.table, "shots": user.shots,
                        "scale": user.scale}
    meta["base_seed"] = meta.pop("seed")
    run = _run_record(meta, prompts, len(prompts) * settings.seeds_per_prompt, args)
    images = _sample_into(out, lambda first, write: sample_model(
        args.model, args.lora, prompts, settings, args.device, args.text_encoding, user=user, on_batch=write,
        first=first), meta, run, args.resume)
    return {"out": str(out), "images": images, "prompts": len(prompts)}


if __name__ == "__main__":
    sys.exit(run_cli(main))
