"""Base vs tuned side by side at identical seeds, a reward under each image: gallery/index.html (+ grid.png) in
--out, and the same images and table in W&B (--wandb offline|online; off by default).

    python sample/gallery.py --lora runs/toy-raft/final --prompts toy:heldout --max-prompts 12 --out runs/gal
    python sample/gallery.py --lora runs/ppd-exp/ppd/final --user 3 --out runs/gal-user-3   # PPD: one user's images

PPD: a side whose model has a user branch samples for the --user given (one user, or two with --alpha).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from common import (add_model_args, add_reward_args, add_sampling_args, add_user_args, check_models,
                    check_out_of_models, check_rewards_read, check_user_flags, default_model, has_user_branch,
                    load_reward_set, run_cli, settings_from, user_choice_from)


def gallery_rows(prompts: List[str], sets: Dict[str, object], scores: Dict[str, Dict[str, List[float]]],
                 k: int) -> List[Dict]:
    """One row per prompt: the k images of each model in turn, each captioned with its rewards."""
    from t2i_align.gallery import to_uint8

    images = {name: to_uint8(s.images) for name, s in sets.items()}
    rows = []
    for i, prompt in enumerate(prompts):
        cells, caps = [], []
        for name in sets:
            for j in range(i * k, (i + 1) * k):
                cells.append(images[name][j])
                caps.append(" · ".join(f"{r} {v[j]:.3g}" for r, v in scores[name].items()))
        rows.append({"prompt": prompt, "images": cells, "captions": caps,
                     "meta": {"seeds": ", ".join(str(s) for s in sets[name].seeds[i * k:(i + 1) * k])}})
    return rows


def _sample_sets(models: Dict[str, tuple], prompts: List[str], settings, device: str, user) -> Dict[str, object]:
    """Each side's samples, the tuned side first (most flags, --lora and --user, are its, and fail at its loading,
    not after the base was sampled); a side with a PPD user branch samples for `user`."""
    from t2i_align.evaluation import sample_model

    sets = {name: sample_model(models[name][0], models[name][1], prompts, settings, device, models[name][2],
                               user=user if has_user_branch(*models[name][:2]) else None)
            for name in sorted(models, key=lambda name: name != "tuned")}
    return {name: sets[name] for name in models}  # columns: base, then tuned


def _reads(reward, prompts) -> bool:
    from reward_models.base import PromptsRejected

    try:
        reward.check_prompts(prompts)
    except PromptsRejected:
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_model_args(p, prefix="base-")
    add_sampling_args(p)
    add_reward_args(p, default=None, helptext="toy-judge when it reads the prompts, toy captions only, else none")
    add_user_args(p)
    p.set_defaults(seeds_per_prompt=2)
    p.add_argument("--no-base", action="store_true", help="show only --model (no base column)")
    p.add_argument("--max-prompts", type=int, default=16, help="first N prompts of the set (default 16)")
    p.add_argument("--out", required=True, help="run folder: gallery/ (and wandb/) go here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out/gallery")
    p.add_argument("--wandb", default="off", choices=("off", "offline", "online", "auto"))
    p.add_argument("--project", default="t2i-align")
    return p


def _is_run_folder(folder: Path) -> bool:
    """A training run's output_dir: its metrics.jsonl, or (before its first log line) the config.yaml it writes."""
    if (folder / "metrics.jsonl").is_file():
        return True
    try:
        import yaml

        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and {"model", "objective", "train"} <= set(config)


def _check_out(args) -> None:
    """--out is not a training run's folder nor inside a model or LoRA folder, and its gallery/ can be replaced."""
    from t2i_align.files import check_output_path, check_replaceable_folder

    from reward_models.cli import UsageError

    if _is_run_folder(Path(args.out)):  # its gallery/ is the run's own
        raise UsageError(f"--out {args.out} is a training run's folder (its gallery/ is the run's own): choose "
                         "another --out, e.g. runs/gallery-NAME")
    check_out_of_models(args, ("--lora", "--base-lora", "--model", "--base-model"))
    check_replaceable_folder(Path(args.out) / "gallery", "--out", "gallery.py")
    # grid.png: every gallery this project writes has one; --overwrite replaced any OUT/gallery, a user's photos too
    check_output_path(args.out, "--out", folder=True, replaces=[Path(args.out) / "gallery"], overwrite=args.overwrite,
                      made_by="grid.png")


def main(argv: Optional[List[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    default_model(args)
    from t2i_align.evaluation import score_samples
    from t2i_align.prompts import read_prompts
    from t2i_align.tracking import Tracker

    from reward_models.cli import UsageError

    if args.max_prompts < 1 or (args.no_base and (args.base_model or args.base_lora or args.base_text_encoding)):
        raise UsageError("need --max-prompts >= 1, and no --base-model / --base-lora / --base-text-encoding with "
                         "--no-base")
    _check_out(args)
    prompts = read_prompts(args.prompts, "--prompts")[: args.max_prompts]
    settings = settings_from(args, len(prompts))
    rewards = load_reward_set(args.reward or "toy-judge", args.option, args.device) if args.reward != "" else {}
    # the default refused real prompts: a gallery of them needed --reward ''
    if args.reward is None and "toy-judge" in rewards and not _reads(rewards["toy-judge"], prompts):
        rewards = {}
        print("note: no reward under the images (toy-judge reads only toy captions); --reward NAME adds one",
              file=sys.stderr)
    check_rewards_read(rewards, prompts, none_ok=True)
    models = {"tuned": (args.model, args.lora, args.text_encoding)}
    if not args.no_base:
        models = {"base": (args.base_model or args.model, args.base_lora, args.base_text_encoding), **models}
    check_models(models, args.vae)
    check_user_flags(args, [(m, lora) for m, lora, _ in models.values()])
    user = user_choice_from(args)
    # started before sampling: W&B refusing to start (online without a key) fails in the first seconds
    existed = Path(args.out).exists()
    who = {"user": user.ids, "alpha": user.alpha, "user_scale": user.scale} if user.given else {}
    tracker = None
    try:
        tracker = Tracker(args.out, args.wandb, args.project, config={"models": models, **who, **settings.as_dict()})
        sets = _sample_sets(models, prompts, settings, args.device, user)
    except BaseException:  # W&B refusing to start, a model that fails to load (a LoRA of another family): no --out
        # left behind holding only the W&B run that failed (ended, not left open)
        if tracker is not None:
            tracker.finish()
        if not existed and Path(args.out).is_dir() and {p.name for p in Path(args.out).iterdir()} <= {"wandb"}:
            shutil.rmtree(args.out)
        raise
    scores = {name: score_samples(s, rewards) for name, s in sets.items()}
    k = settings.seeds_per_prompt
    columns = [f"{name} · seed {j}" for name in sets for j in range(k)]
    title = " vs ".join(f"{name}: {m}" + (f" + {lora}" if lora else "") for name, (m, lora, _) in models.items())
    title += f" · user {' / '.join(user.ids)}" if user.ids else ""
    path = tracker.log_gallery(gallery_rows(prompts, sets, scores, k), 0, columns, name="gallery", title=title)
    wandb_dir = tracker.wandb_run_dir
    tracker.finish()
    return {"gallery": str(path / "index.html"), "wandb_run_dir": str(wandb_dir) if wandb_dir else None,
            "prompts": len(prompts), "images_per_model": len(prompts) * k}


if __name__ == "__main__":
    sys.exit(run_cli(main))
