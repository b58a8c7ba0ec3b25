"""Run by tests/test_multiprocess.py under `accelerate launch --num_processes 2 --cpu`: train, then each rank
writes a checksum of its trainable parameters so the test can check they are identical across ranks."""
import json
import sys
from pathlib import Path

from accelerate import PartialState

from t2i_align.config import load_config
from t2i_align.loop import train

from t2i_align.references import SnapshotPool

cfg = load_config(None, sys.argv[1:])
draws = []
original_begin = SnapshotPool.begin_step


def recording_begin(self, step):  # SePPO runs: which snapshot each process drew at each step
    original_begin(self, step)
    draws.append(self.current)


SnapshotPool.begin_step = recording_begin
result = train(cfg)
if draws:
    Path(cfg.output_dir, f"draws{PartialState().process_index}.json").write_text(json.dumps(draws))
params = [p for p in result.unet.parameters() if p.requires_grad]
digest = [round(float(p.detach().double().sum()), 12) for p in params]
Path(cfg.output_dir, f"rank{PartialState().process_index}.txt").write_text(repr(digest))
