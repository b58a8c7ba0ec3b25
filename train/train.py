"""Train with any objective on the shared loop:

    accelerate launch train/train.py --config configs/toy/dpo.yaml train.max_steps=200 output_dir=runs/x

Everything after the options is a dotted `key=value` override of the config (see t2i_align/config/sections.py).
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

    from reward_models.base import CheckpointMismatchError, WeightsNotFoundError
    from t2i_align.config import ConfigError, load_config
    from t2i_align.loop import NonFiniteError, train
    from t2i_align.models import ModelLoadError
    from t2i_align.toy.assets import ToyAssetError

    try:
        cfg = load_config(args.config, args.overrides)
        print(f"final model: {train(cfg).final}")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ModelLoadError, ToyAssetError, WeightsNotFoundError, CheckpointMismatchError, NonFiniteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
