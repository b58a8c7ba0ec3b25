"""Train with any objective on the shared loop:

    accelerate launch train/train.py --config configs/toy/dpo.yaml train.max_steps=200 output_dir=runs/x

Everything after the options is a dotted `key=value` override of the config (see t2i_align/config/sections.py).
A mistake in the config or its files ends as one line `error: ...` with exit code 2 (T2I_ALIGN_DEBUG=1 shows the
traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML config (configs/toy/dpo.yaml, "
                        "configs/sd15/dpo_lora.yaml, ...); one per run (a file builds on another with `base:`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (YAML, as the run would "
                        "save it) and make the checks done before a model loads (data files and their usable pairs, "
                        "rewards, user table, the model folder and LoRA targets, the checkpoint to resume); loads and "
                        "writes nothing")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    if args.config and len(args.config) > 1:  # argparse keeps the last one silently
        parser.error(f"--config given {len(args.config)} times ({', '.join(args.config)}): give one; a config "
                     "builds on another with `base: other.yaml` in its YAML, and key=value overrides go after it")
    args.config = args.config[0] if args.config else None

    from t2i_align.errors import UserError, run_cli

    def run() -> int:
        from accelerate import PartialState

        from t2i_align.config import load_config
        from t2i_align.loop import train

        with warnings.catch_warnings():
            if os.environ.get("RANK", "0") != "0":  # every process reads the config: its warnings once, by rank 0
                warnings.simplefilter("ignore")
            try:
                cfg = load_config(args.config, args.overrides)
            except UserError as err:  # every process of a machine reads the same files: one line per machine
                err.once_per_machine = True
                raise
        if args.config is None and os.environ.get("RANK", "0") == "0":
            print("note: no --config: the built-in defaults (t2i_align/config/sections.py: the toy model, a full "
                  "fine-tune) plus the overrides; pass --config configs/...yaml for a recipe", file=sys.stderr)
        if args.dry_run:
            return dry_run(cfg)
        try:
            final = train(cfg).final
        # Ctrl-C: run_cli says where to resume once per launch; the process dies by SIGINT (a shell loop stops)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(where_to_resume(cfg)) from None
        except Exception as err:
            told = disk_full(err, cfg)
            if told is None:
                raise
            raise told from err
        state = PartialState()
        if state.is_main_process:
            print(f"final model: {final}")
        # gloo's threads still holding work when Python tears down can abort a finished process (SIGABRT,
        # "terminate called without an active exception": pytorch/pytorch#179291): the launch then failed
        state.destroy_process_group()
        return 0

    return run_cli(run, sigterm=False)  # the launcher stops every process together


def dry_run(cfg) -> int:
    """The resolved config on stdout, once the checks that need no weights, engine or output folder have passed."""

    from t2i_align.adapters import check_targets_in_folder
    from t2i_align.build import check_before_loading
    from t2i_align.checkpoints import resolve_resume
    from t2i_align.config.loader import dump_config
    from t2i_align.data.sources import check_pair_rows
    from t2i_align.models import check_tuned_folder, local_model_folder, model_family
    from t2i_align.objectives import get_objective
    from t2i_align.pipeline_checks import check_listed_parts
    from t2i_align.resume import check_resume_settings
    from t2i_align.weight_files import weights_variant

    check_before_loading(cfg, get_objective(cfg.objective.name).configure(cfg).batch_kind)
    rows = check_pair_rows(cfg)  # the label and caption columns: none usable failed after the model loaded
    resume = resolve_resume(cfg.output_dir, cfg.train.resume)  # a typo'd folder failed only when the run started
    if resume is not None:  # one past max_steps, or of another optimizer, passed and failed when the run started
        check_resume_settings(resume, cfg)
    # its model_index.json and component folders only: no weights load
    folder = local_model_folder(cfg.model.pretrained, ("vae",) if cfg.model.vae else (),
                                revision=cfg.model.revision, variant=cfg.model.variant)
    if cfg.model.vae:  # a typo'd path failed only when the run loaded
        local_model_folder(cfg.model.vae, pipeline=False, key="model.vae")
    if folder is not None:
        check_tuned_folder(folder, cfg.model.text_encoding)
        check_listed_parts(folder, model_family(cfg.model, folder), vae_given=bool(cfg.model.vae))
        weights_variant(folder, cfg.model.variant)  # file names only
        if cfg.lora.enabled:  # the UNet's layer names, built from its config without weights
            check_targets_in_folder(folder, cfg.lora.target_modules)
    print(dump_config(cfg), end="")
    if rows:
        print(rows, file=sys.stderr)
    import torch

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():  # said only when the run started
        print("note: train.mixed_precision=fp16 needs a GPU, which this machine lacks: the run would stop at its "
              "start (on a CPU: train.mixed_precision=bf16 model.weight_dtype=bf16, or no and fp32)", file=sys.stderr)
    model = "a hub id, fetched when the run starts" if folder is None else "its folder and family"
    print(f"dry run: the config, its data, rewards and files, and the model ({model}) pass the checks made before "
          "weights load (the launcher and output_dir are checked when the run starts)", file=sys.stderr)
    return 0


def disk_full(err: Exception, cfg):
    """A full disk (an export, a gallery, a cache) as a UserError saying where to resume: "run again" started a
    fresh run that set this one aside. None for any other error."""
    from t2i_align.errors import DISK_HINT, UserError, is_disk_error, one_line

    text = one_line(err)
    if not (is_disk_error(err) or text.endswith(DISK_HINT)):  # other processes get the main one's as text
        return None
    text = text[:-len(DISK_HINT)].rstrip(": ") if text.endswith(DISK_HINT) else text
    return UserError(f"{text}: free space or write elsewhere. {where_to_resume(cfg)}")


def where_to_resume(cfg) -> str:
    """After an interruption: the newest complete checkpoint and how to continue from it, or that there is none."""
    from t2i_align.checkpoints import list_checkpoints

    found = list_checkpoints(cfg.output_dir)
    if not found:
        return (f"No checkpoint was written (train.checkpoint_every={cfg.train.checkpoint_every}): a rerun starts "
                "fresh.")
    return f"The newest complete checkpoint is {found[-1][1]}: continue with train.resume=latest and this output_dir."


if __name__ == "__main__":
    sys.exit(main())
