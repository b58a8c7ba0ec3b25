"""Tuned vs base on prompt sets at identical seeds: each model's mean reward (95 % CI), the win rate of tuned
over base (ties half, Wilson 95 % interval, sign-test p) and the paired difference (t-test p), and with several seeds
per prompt both tests over the prompts (`per_prompt`: the p-values to read), as JSON. With several rewards, `holm`
holds each test's p-values Holm-adjusted over the rewards (of a set), the ones to read when they are read together.

    python sample/compare.py --lora runs/toy-raft/final --prompts toy:heldout --seeds-per-prompt 8
    python sample/compare.py --base /data/sd15 --model /data/sd15 --lora runs/sd15-dpo-lora/final \\
        --prompts parti.txt --reward pickscore,hpsv2 --option pickscore.model_dir=/w/PickScore_v1 ... --device cuda

--prompts may be repeated: one block of results per prompt set. PPD: `--user ID` (repeatable) compares per user,
one block per prompt set and user ("SET · user ID"); a side whose model has a user branch samples for that user.

    python sample/compare.py --lora runs/ppd-exp/ppd/final --prompts users.txt --user 20 --user 21 --reward toy-clip
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from common import (add_model_args, add_reward_args, add_sampling_args, add_user_args, check_models,
                    check_out_of_models, check_rewards_read, check_user_flags, default_model, encoding_record,
                    has_user_branch, load_reward_set, note_training_seeds, run_cli, settings_from, user_choice_from)


def read_sets(args) -> tuple:
    """Before any reward or model loads: every prompt set read, the sampling settings, each set making the two
    image pairs a comparison needs."""
    from t2i_align.prompts import read_prompts

    from reward_models.cli import UsageError

    specs = list(dict.fromkeys(args.prompts))  # a set given twice was sampled twice, its block overwritten
    if len(specs) < len(args.prompts):
        print(f"note: --prompts repeats a set; each is compared once ({', '.join(specs)})", file=sys.stderr)
    args.prompts = specs
    prompt_sets = {spec: read_prompts(spec, "--prompts") for spec in specs}
    for spec, prompts in prompt_sets.items():
        if len(set(prompts)) < len(prompts):
            print(f"note: --prompts {spec} holds {len(prompts) - len(set(prompts))} repeated prompt(s): each is "
                  "sampled at its line's seeds, and counted once in the per-prompt tests", file=sys.stderr)
    settings = settings_from(args, max(len(prompts) for prompts in prompt_sets.values()))
    for spec, prompts in prompt_sets.items():
        if len(prompts) * settings.seeds_per_prompt < 2:  # compare_scores needs 2 pairs: refuse before sampling
            raise UsageError(f"--prompts {spec}: 1 prompt at --seeds-per-prompt 1 makes one image pair, and a "
                             "comparison needs at least 2: give more prompts or --seeds-per-prompt 2 or more")
    return prompt_sets, settings


def compare_sets(args, rewards, save=None, sets=None) -> dict:
    """The comparison, set by set (`sets`: read_sets(args), read here if not given); `save(result so far)` after
    each set, so that a later set's failure (out of memory, a bad prompt) keeps what was sampled: `unfinished`
    lists the blocks not yet compared."""
    from t2i_align.evaluation import compare_scores, holm_over_rewards, sample_model, score_samples

    prompt_sets, settings = sets or read_sets(args)
    # a full fine-tune's final/ given as --model (or --base) comes from a run as a LoRA does
    full = {m for m in (args.model, args.base) if m and m != "toy" and (Path(m) / "model_index.json").is_file()}
    for weights in ({args.lora, args.base_lora} - {None}) | full:
        note_training_seeds(weights, settings, max(len(prompts) for prompts in prompt_sets.values()))
    for prompts in prompt_sets.values():
        check_rewards_read(rewards, prompts)
    blocks = [(s, u) for s in args.prompts for u in (args.user or [None])]
    result = {"base": {"model": args.base, "lora": args.base_lora, **args.records["base"]},
              "tuned": {"model": args.model, "lora": args.lora, **args.records["tuned"]},
              "settings": settings.as_dict(), "sets": {}, "unfinished": [_key(*b) for b in blocks]}
    unbranched = {}  # prompt set -> scores of a side without a user branch: the same for every --user
    branched = {"tuned": has_user_branch(args.model, args.lora), "base": has_user_branch(args.base, args.base_lora)}
    for spec, user_id in blocks:
        prompts = prompt_sets[spec]
        scores, user = {}, user_choice_from(args, user_id)
        # by the prompt's text: a prompt on two lines is one unit of the per-prompt tests, not two independent ones
        groups = [prompts[i // settings.seeds_per_prompt] for i in range(len(prompts) * settings.seeds_per_prompt)]
        # the tuned side first: most flags (--user ...) are its, and fail at its loading
        for side, model, lora, encoding in (("tuned", args.model, args.lora, args.text_encoding),
                                            ("base", args.base, args.base_lora, args.base_text_encoding)):
            branch = branched[side]
            if not branch and (spec, side) in unbranched:
                scores[side] = unbranched[spec, side]
                continue
            scores[side] = {name: [] for name in rewards}

            def score(batch, side=side) -> None:  # each batch scored as it comes: no side's images all held
                for name, values in score_samples(batch, rewards).items():
                    scores[side][name] += values
            sample_model(model, lora, prompts, settings, args.device, encoding, user=user if branch else None,
                         on_batch=score)
            if not branch:
                unbranched[spec, side] = scores[side]
        block = result["sets"][_key(spec, user_id)] = {
            "prompts": len(prompts), "images_per_model": len(prompts) * settings.seeds_per_prompt,
            "rewards": {name: compare_scores(scores["base"][name], scores["tuned"][name], groups) for name in rewards}}
        if len(rewards) > 1:  # several rewards are read as one table
            block["holm"] = holm_over_rewards(block["rewards"])
        result["unfinished"].remove(_key(spec, user_id))
        if save is not None:
            save(result)
    return result


def _key(spec: str, user_id) -> str:
    return spec if user_id is None else f"{spec} · user {user_id}"


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_model_args(p, prefix="base-")
    add_sampling_args(p, several_prompt_sets=True)
    add_reward_args(p)
    add_user_args(p)
    p.add_argument("--base", default=None, help="base model folder (default: the same as --model)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    default_model(args)
    from reward_models.cli import UsageError

    if args.base and args.base_model and args.base != args.base_model:
        raise UsageError(f"--base {args.base} and --base-model {args.base_model} name two base models: give one")
    if args.out is not None:  # "" is no file to write (it wrote none, without a word)
        from t2i_align.files import check_output_path, given_path

        given_path(args.out, "--out")
        inputs = {"--lora": args.lora, "--base-lora": args.base_lora,
                  **{"--prompts" + (f" (#{i + 1})" if i else ""): spec for i, spec in enumerate(args.prompts or [])
                     if not spec.startswith("toy:")}}
        check_output_path(args.out, "--out", folder=False, inputs={k: v for k, v in inputs.items() if v},
                          replaces=[Path(args.out)], overwrite=args.overwrite)
        check_out_of_models(args, ("--lora", "--base-lora", "--model", "--base", "--base-model"))
    args.base = args.base or args.base_model or args.model
    itself = (args.base, args.base_lora, args.base_text_encoding) == (args.model, args.lora, args.text_encoding)
    encodings = check_models({"tuned": (args.model, args.lora, args.text_encoding),
                              "base": (args.base, args.base_lora, args.base_text_encoding)}, args.vae)
    if itself:  # after the folders' checks: a folder that cannot sample gets its error alone
        print(f"note: --model {args.model} is compared with itself (no --lora, no other --base): a check of the "
              "statistics (win rate 0.5); to judge a tuned model give its --lora, or --base the original",
              file=sys.stderr)
    args.text_encoding, args.base_text_encoding = encodings["tuned"].kind, encodings["base"].kind  # as sampled
    args.records = {side: encoding_record(encoding) for side, encoding in encodings.items()}  # in --out
    if args.alpha is not None:
        raise UsageError("--alpha: compare runs one user at a time (each --user in turn); interpolate with "
                         "sample/generate.py")
    check_user_flags(args, [(args.base, args.base_lora), (args.model, args.lora)])
    args.prompts = args.prompts or ["toy:heldout"]
    sets = read_sets(args)  # a typo'd prompt file or a count reported before the rewards load
    rewards, kept = load_reward_set(args.reward, args.option, args.device), {}
    try:
        return compare_sets(args, rewards, save=_saver(Path(args.out)) if args.out else kept.update, sets=sets)
    except BaseException:  # without --out, the sets compared before a failure were lost with it
        if kept.get("sets"):
            from t2i_align.files import finite_json

            print(json.dumps(finite_json(kept), indent=2, default=str, allow_nan=False))
            print(f"note: the {len(kept['sets'])} set(s) compared before the failure are printed above (--out keeps "
                  "them in a file)", file=sys.stderr)
        raise


def _saver(out: Path):
    """Writes the result so far to `out` (whole, replacing the previous write); while sets remain (`unfinished`
    in the file), a note on stderr says so, the last word if a later set fails."""
    from t2i_align.files import write_json_atomic

    def save(result: dict) -> None:
        write_json_atomic(out, result)
        if result["unfinished"]:
            print(f"note: {out} holds the {len(result['sets'])} set(s) compared so far", file=sys.stderr)

    return save


if __name__ == "__main__":
    sys.exit(run_cli(main))
