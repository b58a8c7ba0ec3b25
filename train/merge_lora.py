"""Merge a LoRA into its base model (LongAlign: stage 1's LoRA is merged before stage 2 trains a new one):

    python train/merge_lora.py --model toy --lora runs/longalign-stage1/final --out runs/longalign-stage1/merged

or put a UNet-only checkpoint (a released full fine-tune holding unet/ alone) into its base pipeline:

    python train/merge_lora.py --model /data/sd15 --unet /data/dpo-sd1.5-text2image-v1 --out /data/dpo-sd15

The output is a full diffusers pipeline folder, usable as `model.pretrained` and by sample/; the LoRA's recorded
text encoding (e.g. segments) is recorded in it too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="base diffusers folder (default: the model --lora records it trained on, else toy)")
    parser.add_argument("--lora", default=None, help="pytorch_lora_weights.safetensors or the folder holding it")
    parser.add_argument("--unet", default=None,
                        help="a UNet checkpoint replacing the base's UNet (before --lora): a diffusers UNet folder, "
                             "or a folder holding one as unet/")
    parser.add_argument("--out", required=True, help="output folder for the merged pipeline")
    parser.add_argument("--text-encoding", choices=("clip77", "segments"), default=None,
                        help="only if the LoRA folder records none (final/ folders record theirs)")
    parser.add_argument("--variant", default=None,
                        help="the base's weights variant to read (e.g. fp16) where its folder holds several")
    parser.add_argument("--vae", default=None,
                        help="a VAE replacing the base's (its folder, or a pipeline folder holding vae/): the "
                             "model.vae the LoRA's run trained with, which it records")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)

    from t2i_align.errors import run_cli

    def run() -> int:
        from t2i_align.merge import merge_lora
        from t2i_align.base_model import default_model

        args.model = default_model(args.model, args.lora)
        out = merge_lora(args.model, args.lora, args.out, args.text_encoding, args.overwrite, args.unet,
                         args.variant, args.vae)
        print(json.dumps({"merged": str(out), "model": args.model, "lora": args.lora, "unet": args.unet}))
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
