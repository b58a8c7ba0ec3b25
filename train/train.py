"""Train with any objective on the shared loop:

    accelerate launch train/train.py --config configs/toy/dpo.yaml train.max_steps=200 output_dir=runs/x

Everything after the options is a dotted `key=value` override of the config (see t2i_align/config/sections.py).
A mistake in the config or its files ends as one line `error: ...` with exit code 2 (T2I_ALIGN_DEBUG=1 shows the
traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/toy/dpo.yaml, configs/sd15/dpo_lora.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)

    from t2i_align.errors import run_cli

    def run() -> int:
        from t2i_align.config import load_config
        from t2i_align.loop import train

        cfg = load_config(args.config, args.overrides)
        print(f"final model: {train(cfg).final}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
