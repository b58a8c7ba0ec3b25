"""Arguments and error handling shared by the sample/ scripts."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional


def add_model_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}model", default=None,
                   help="diffusers folder, or toy" + (" (default: the same as --model)" if prefix else
                                                      " (default: the model --lora records it trained on, else toy)"))
    p.add_argument(f"--{prefix}lora", default=None, help="LoRA weights (file, or the folder holding it)")
    p.add_argument(f"--{prefix}text-encoding", choices=("clip77", "segments"), default=None,
                   help="prompt encoding (default: the one recorded with the weights, else clip77; LongAlign-tuned "
                        "models record segments)")


def default_model(args) -> None:
    """--model when not given: the model the LoRA records it was trained on, else toy (README's commands without
    --model sampled the toy model under a real model's LoRA); `t2i_align.base_model.default_model`."""
    from t2i_align.base_model import default_model as recorded

    args.model = recorded(args.model, args.lora)  # main runs inside run_cli: an error is one line


def add_sampling_args(p: argparse.ArgumentParser, several_prompt_sets: bool = False) -> None:
    helptext = ("text file with one prompt per line, a .jsonl / .csv with a prompt field, a parquet file's caption "
                "column, or toy:heldout / toy:train (default toy:heldout)")
    if several_prompt_sets:
        p.add_argument("--prompts", action="append", help=helptext + "; repeat for several sets")
    else:
        p.add_argument("--prompts", default="toy:heldout", help=helptext)
    p.add_argument("--seeds-per-prompt", type=int, default=4, help="images per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k of prompt i uses seed + 10000k + i")
    p.add_argument("--scheduler", choices=("ddim", "dpm++", "euler"), default=None,
                   help="sampler (default: the model folder's own)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: diffusers' pipelines' own, 7.5 for SD1.5 and 5.0 "
                        "for SDXL; 3.0 for the toy and models made from it)")
    p.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (halved on OOM)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the pipeline's dtype (default fp32; fp16 / bf16 are faster on a GPU)")
    p.add_argument("--vae", default=None,
                   help="a VAE to decode with instead of the model folder's (its folder, or a pipeline folder holding "
                        "vae/): the model.vae a run trained with; in compare.py both sides")
    p.add_argument("--variant", default=None,
                   help="weight files to load, e.g. fp16 for *.fp16.safetensors, from a model folder holding them "
                        "(others load their plain weights; default: plain weights, else a folder's only variant)")


def _device(name: str) -> str:
    """--device checked when the arguments are read ("gpu", or a GPU this machine lacks, failed after loading)."""
    from reward_models.base import resolve_device

    try:
        resolve_device(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return name


def settings_from(args, num_prompts: int):
    """SampleSettings from the flags, checked for sampling `num_prompts` prompts (the largest set's count)."""
    from t2i_align.evaluation import SampleSettings

    from reward_models.cli import UsageError

    for flag in ("seeds_per_prompt", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number >= 1")
    _check_seeds(args.seed, args.seeds_per_prompt, num_prompts)
    if args.guidance is None:
        args.guidance = default_guidance(args.model)
    if not math.isfinite(args.guidance) or args.guidance < 0 or (args.negative_prompt and args.guidance <= 1):
        raise UsageError(f"--guidance {args.guidance}: give a scale >= 0, and > 1 with --negative-prompt (at 1 or "
                         "less there is no classifier-free guidance, so the negative prompt would be unused)")
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and (size < 8 or size % 8):  # diffusers' pipelines would round it down silently
            raise UsageError(f"{flag} {size}: give a positive multiple of 8 (the VAE's scale), "
                             f"e.g. {max(8, size // 8 * 8)}")
    return SampleSettings(seeds_per_prompt=args.seeds_per_prompt, seed=args.seed, scheduler=args.scheduler,
                          steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                          negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                          dtype=args.dtype, variant=args.variant, vae=args.vae)


def default_guidance(model: str) -> float:
    """The scale a model is sampled at when --guidance is not given: 3.0 for the toy model and models made from it
    (its gallery's; a merged or fully fine-tuned toy was sampled at 7.5), else its diffusers pipeline's default, 5.0
    for SDXL and 7.5 for SD1.5 (the toy's 3.0 sampled real models washed out). Read from the folder's
    model_index.json, or a hub id's name."""
    from t2i_align.base_model import made_from_toy

    folder = Path(model).expanduser()
    if made_from_toy(model):
        return 3.0
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):  # a hub id, or a folder the model check refuses later
        name = model
    return 5.0 if "xl" in str(name).lower() else 7.5


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)
"""What torch.Generator.manual_seed accepts; beyond it, an overflow traceback once the model has loaded."""


def _check_seeds(seed: int, per_prompt: int, num_prompts: int) -> None:
    """Every seed sampled, seed + 10000·k + i (`sampling.seeds_for`), must be one torch accepts."""
    from reward_models.cli import UsageError

    top = 10_000 * (per_prompt - 1) + num_prompts - 1  # the largest offset added to --seed
    if num_prompts > 10_000 and per_prompt > 1:
        print(f"note: {num_prompts} prompts at --seeds-per-prompt {per_prompt}: image k + 1 of prompt i and image k "
              "of prompt i + 10000 share a seed (seed + 10000·k + i), so their starting noise is the same",
              file=sys.stderr)
    low, high = SEED_RANGE
    if not low <= seed <= high - top:
        raise UsageError(f"--seed {seed}: image k of prompt i uses seed + 10000·k + i, which must lie in [{low}, "
                         f"{high}]; give a --seed from {low} to {high - top}")


def note_training_seeds(lora, settings, num_prompts: int) -> None:
    """A note on stderr when the images to compare start from noises the run that made `lora` generated its
    RAFT / online-DPO samples from (read from its config.yaml beside final/): those are not fresh seeds."""
    from pathlib import Path

    import yaml

    from t2i_align.data.online import seeds_generated
    from t2i_align.sampling import seeds_for

    folder = Path(lora).resolve() if lora is not None else None
    # the nearest config.yaml above the weights: a checkpoint holds its run's, final/ sits in the run folder
    run = next((f for f in ([folder] + list(folder.parents) if folder else []) if (f / "config.yaml").is_file()),
               None)
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        raft = cfg["raft"]
        if not raft["enabled"]:
            return
        settings_of_run = (int(cfg["seed"]), int(raft["k"]), int(raft["prompts_per_round"]),
                           -(-int(cfg["train"]["max_steps"]) // int(raft["round_steps"])))  # rounds, rounded up
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError):  # no run folder, or not one of ours
        return
    seeds = [s for row in seeds_for(num_prompts, settings.seeds_per_prompt, settings.seed) for s in row]
    hit = seeds_generated(seeds, *settings_of_run)
    if hit:
        print(f"note: {hit} of the {len(seeds)} images compared start from noises {run} drew its RAFT / online-DPO "
              f"samples from (seed {settings_of_run[0]} + 1,000,003·round + 10,000·k + slot): not a fresh test of "
              "it; pick a --seed whose grid it never drew, e.g. --seed 1000000000000", file=sys.stderr)


def check_out_of_models(args, flags) -> None:
    """--out inside a model or LoRA folder (one of `flags`, e.g. "--lora", read from `args`; the shipped "toy" is
    none) could replace its weights or be read as one of its files, and a later export there (a run extended)
    moves the folder aside to final-kept-N/: refused."""
    from t2i_align.base_model import BASE_MODEL_FILE

    from reward_models.cli import UsageError

    out, resolved = args.out, Path(args.out).resolve()
    for flag in flags:
        given_path = getattr(args, flag[2:].replace("-", "_"), None)
        if not given_path or given_path == "toy":
            continue
        folder = Path(given_path)
        if not folder.is_dir():  # a weights file: its folder when an export of ours (RUN/final), not any folder
            folder = folder.parent if (folder.parent / BASE_MODEL_FILE).is_file() else None
        if folder is not None and folder.resolve() in resolved.parents:
            raise UsageError(f"--out {out} lies inside {flag} {folder}, whose files it could replace (and a later "
                             "export there moves it aside): write the results elsewhere, e.g. beside that folder")


def load_reward_set(names: str, options, device: str):
    """--reward a,b and --option NAME.KEY=VALUE, as in t2i-score."""
    from reward_models.cli import load_rewards, parse_options

    listed = [n.strip() for n in names.split(",") if n.strip()]
    return load_rewards(listed, parse_options(options or [], listed), device)


def check_rewards_read(rewards, prompts, none_ok: bool = False) -> None:
    """Before sampling: every reward can score these prompts (toy-judge reads only toy captions), else a one-line
    error now rather than a failure after minutes of sampling. `none_ok`: the script runs without a reward
    (--reward '')."""
    from reward_models.base import PromptsRejected
    from reward_models.cli import UsageError

    for reward in rewards.values():
        try:
            reward.check_prompts(prompts)
        except PromptsRejected as err:  # toy-judge is the default --reward: say how to choose another
            raise UsageError(f"{err}. Choose a --reward that reads these prompts (e.g. clip, pickscore, hpsv2)"
                             + (", or --reward '' for none" if none_ok else "")) from None


def check_models(sides, vae: Optional[str] = None) -> dict:
    """Before sampling: every side ({"tuned" or "base": (model, lora, text encoding)}) can be loaded as asked (a
    typo in the tuned side's --lora was found after the base had been sampled; with --vae `vae`, a folder needs no
    vae/). Returns {side: the text encoding it samples in (a TextEncodingConfig: kind and token budget)}, the one
    recorded with the weights where the flag left it open, for the scripts' records."""
    from t2i_align.sampling import check_weights

    return {side: check_weights(model, lora, encoding, key="--model" if side == "tuned" else "--base-model",
                                vae=vae)[1] for side, (model, lora, encoding) in sides.items()}


def encoding_record(encoding) -> dict:
    """What a script's output records of a side's text encoding: its kind, and its token budget for segments (a
    120- and a 240-token LongAlign model were told apart by nothing)."""
    budget = encoding.token_budget if encoding.kind == "segments" else None
    return {"text_encoding": encoding.kind, "token_budget": budget}


def add_user_args(p: argparse.ArgumentParser) -> None:
    """Who a model with a PPD user branch samples for (user_branch.safetensors next to --lora or in --model)."""
    p.add_argument("--user", action="append", default=None, metavar="ID",
                   help="user id from the user table; twice with --alpha to interpolate between two users")
    p.add_argument("--alpha", type=float, default=None,
                   help="interpolation weight: alpha * second user + (1 - alpha) * first user")
    p.add_argument("--user-table", default=None,
                   help="user table: the file, or the folder holding its user_table.safetensors (default: the one "
                        "next to the weights)")
    p.add_argument("--user-shots", default=None,
                   help="toy users: a Pick-a-Pic-format parquet of the user's labelled pairs, embedded by the toy "
                        "encoder (as many usable pairs as the branch has tokens: 4)")
    p.add_argument("--user-scale", type=float, default=None, help="user scale lambda of the branch (0: base)")


def has_user_branch(model, lora) -> bool:
    """Whether the side (model, lora) loads a PPD user branch: user_branch.safetensors next to the LoRA or in the
    model's folder (as loaded: `~/m`, a hub id in the cache)."""
    from t2i_align.model_folders import resolve_pretrained
    from t2i_align.users.inference import branch_file

    # only where it is: check_models checked the folder (which needs no vae/ with --vae)
    folders = [lora, resolve_pretrained(model, key="--model", skip_parts=("vae",))]
    return any(branch_file(f) is not None for f in folders if f is not None and Path(f).exists())


def check_user_flags(args, sides) -> None:
    """--user and its flags only where a side ((model, lora) pairs) has a user branch to sample for."""
    from reward_models.cli import UsageError

    given = args.user or args.user_shots or args.user_table or args.user_scale is not None or args.alpha is not None
    if given and not any(has_user_branch(model, lora) for model, lora in sides):
        raise UsageError("--user: no model here has a PPD user branch (user_branch.safetensors next to --lora or "
                         "in --model), so there is no one to sample for; drop --user or give a PPD-trained --lora")


def user_choice_from(args, user_id=None):
    """A UserChoice from add_user_args' flags; `user_id` replaces --user (compare.py runs one user at a time)."""
    from t2i_align.users.inference import UserChoice

    ids = [user_id] if user_id is not None else list(args.user or [])
    return UserChoice(ids=ids, alpha=args.alpha, table=args.user_table, shots=args.user_shots, scale=args.user_scale)


def add_reward_args(p: argparse.ArgumentParser, default: Optional[str] = "toy-judge", helptext: str = "") -> None:
    p.add_argument("--reward", default=default,
                   help=f"comma-separated reward names (default {helptext or default})")
    p.add_argument("--option", action="append", metavar="NAME.KEY=VALUE",
                   help="reward option, e.g. clip.checkpoint=/w/clip.safetensors (repeatable)")


def run_cli(main: Callable) -> int:
    """Run `main`, print its result as JSON; user errors print `error: ...` and exit 2 (t2i_align/errors.py), and a
    kill (SIGTERM) cleans up as an exception does (a staged folder removed; generate.py keeps OUT.partial)."""
    from t2i_align.errors import run_cli as run_reporting_user_errors

    from t2i_align.files import finite_json

    def run() -> int:  # NaN / inf as null: valid JSON, as the scripts' --out files
        print(json.dumps(finite_json(main()), indent=2, default=str, allow_nan=False))
        return 0

    return run_reporting_user_errors(run)
