"""Generate images for a prompts file at fixed seeds: PNGs plus metadata.jsonl (what `t2i-score FOLDER` reads).

    python sample/generate.py --model toy --prompts toy:heldout --seeds-per-prompt 2 --out runs/samples
    python sample/generate.py --model /data/sd15 --lora runs/sd15-dpo/final --prompts prompts.txt \
        --scheduler dpm++ --steps 25 --guidance 7.5 --device cuda --out runs/sd15-samples
    python sample/generate.py --lora runs/toy-ppd/final --user 3 --out runs/user-3       # PPD: one user
    python sample/generate.py --lora runs/toy-ppd/final --user 3 --user 5 --alpha 0.25 --out runs/mix

The folder is written whole or not at all; an existing non-empty --out is kept unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import List, Optional

from common import (add_model_args, add_sampling_args, add_user_args, check_models, default_model, run_cli,
                    settings_from, user_choice_from)


MADE_BY = "t2i_align_generated.json"
"""Marks a folder generate.py wrote (metadata.jsonl alone does not: Hugging Face's imagefolder data sets have one)."""

def _sample_into(out: Path, sample, meta: dict) -> int:
    """`sample(on_batch)` run with each batch's PNGs written as it comes (not every image held in memory), then
    metadata.jsonl; the folder published whole at the end. Returns the number of images."""
    from t2i_align.files import staged_dir
    from t2i_align.gallery import to_pil, to_uint8

    lines: List[str] = []

    def write(batch) -> None:
        for image, prompt, seed in zip(to_uint8(batch.images), batch.prompts, batch.seeds):
            name = f"{len(lines):05d}.png"
            to_pil(image).save(tmp / name)
            lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed, **meta}))

    with staged_dir(out) as tmp:  # a full disk or a kill leaves no hidden half-written folder behind
        sample(write)
        (tmp / "metadata.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        (tmp / MADE_BY).write_text(json.dumps({"images": len(lines)}) + "\n")  # --overwrite may replace it
    return len(lines)


def _check_out(args) -> None:
    """Before any work: --out is a folder that can be replaced whole, and holds none of the script's inputs."""
    from t2i_align.files import check_output_path, check_replaceable_folder

    out = Path(args.out)
    check_replaceable_folder(out, "--out", "generate.py")
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
    if not (out / MADE_BY).is_file():
        return []
    ours, listing = {MADE_BY, "metadata.jsonl"}, out / "metadata.jsonl"
    for line in listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []:
        with contextlib.suppress(ValueError, AttributeError):  # a torn or edited line: its image counts as added
            ours.add(json.loads(line).get("file"))
    # hidden files a file browser or notebook leaves (.DS_Store, .ipynb_checkpoints) and Windows' Thumbs.db are not
    # the user's work
    return sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")
                  and p.name != "Thumbs.db")


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_user_args(p)
    p.add_argument("--out", required=True, help="output folder (PNGs + metadata.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = p.parse_args(argv)
    default_model(args)
    from t2i_align.evaluation import sample_model
    from t2i_align.models import resolve_pretrained
    from t2i_align.weight_files import weights_variant
    from t2i_align.prompts import read_prompts

    out = Path(args.out)
    _check_out(args)
    # named by their flags if wrong; the encoding recorded with the weights goes into metadata.jsonl
    args.text_encoding = check_models({"tuned": (args.model, args.lora, args.text_encoding)})["tuned"]
    prompts = read_prompts(args.prompts, "--prompts")
    settings = settings_from(args, len(prompts))
    user = user_choice_from(args)
    meta = {"model": args.model, "lora": args.lora, "text_encoding": args.text_encoding, **settings.as_dict()}
    meta["variant"] = weights_variant(resolve_pretrained(args.model, key="--model"), args.variant, "--variant",
                                      fallback=True)  # the weights loaded (--variant falls back to plain ones)
    if user.given:
        meta["user"] = {"ids": user.ids, "alpha": user.alpha, "table": user.table, "shots": user.shots,
                        "scale": user.scale}
    meta["base_seed"] = meta.pop("seed")
    images = _sample_into(out, lambda write: sample_model(args.model, args.lora, prompts, settings, args.device,
                                                          args.text_encoding, user=user, on_batch=write), meta)
    return {"out": str(out), "images": images, "prompts": len(prompts)}


if __name__ == "__main__":
    sys.exit(run_cli(main))
