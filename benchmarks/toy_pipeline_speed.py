"""Time plain `StableDiffusionPipeline.from_pretrained(<toy pipeline>)`: load, then one image at the pipeline's
default 50 steps (and a batch of 16), on this machine's CPU. Prints JSON.

    python benchmarks/toy_pipeline_speed.py
"""
import argparse
import json
import os
import platform
import time

import torch
from diffusers import StableDiffusionPipeline

from t2i_align.toy.assets import pipeline_dir


def main() -> None:
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir()))
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    prompt = "a large red circle at the top left on a white background"
    timings = {}
    for batch in (1, 16):
        t0 = time.perf_counter()
        pipe([prompt] * batch, generator=torch.Generator().manual_seed(0))
        timings[f"batch_{batch}_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps({"load_s": round(load_s, 3), **timings, "steps": 50, "torch_threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
