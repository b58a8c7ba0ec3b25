"""Run by tests/test_multiprocess.py under `accelerate launch --num_processes 2 --cpu`: train, then each rank
writes a checksum of its trainable parameters so the test can check they are identical across ranks."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

from t2i_align.config import load_config
from t2i_align.loop import train

from t2i_align.references import SnapshotPool


def allow_fsdp_on_cpu():
    """accelerate enables FSDP only on GPU-type machines (AcceleratorState keeps MULTI_CPU and drops the plugin on
    CPUs), although torch's FSDP2 runs on CPU over gloo. Lift that one gate so the loop runs accelerate's real FSDP2
    preparation, sharded checkpoints and state-dict gathering on two CPU processes (tests/test_fsdp.py)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            if self._mixed_precision != "no":  # as accelerate's GPU branch does
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    AcceleratorState.__init__ = init


def allow_deepspeed_on_cpu():
    """accelerate starts DeepSpeed only where its launcher found GPUs (with ACCELERATE_USE_CPU it ignores DeepSpeed;
    without, it runs one process while DeepSpeed sees two). DeepSpeed's own CPU accelerator runs over gloo
    (DS_ACCELERATOR=cpu): take accelerate's multi-CPU backend without its CPU flag, so its DeepSpeed branch runs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend


if os.environ.get("T2I_TEST_FSDP_ON_CPU") == "1":
    allow_fsdp_on_cpu()
if os.environ.get("T2I_TEST_DEEPSPEED_ON_CPU") == "1":
    allow_deepspeed_on_cpu()

cfg = load_config(None, sys.argv[1:])
draws = []
original_begin = SnapshotPool.begin_step


def recording_begin(self, step):  # SePPO runs: which snapshot each process drew at each step
    original_begin(self, step)
    draws.append(self.current)


SnapshotPool.begin_step = recording_begin
FAILS = os.environ.get("T2I_TEST_FAILS")  # one process failing alone: "metrics" on rank 0, "raft" on rank 1
if FAILS == "metrics" and os.environ.get("RANK") == "0":
    from t2i_align.tracking import Tracker

    def full_disk(self, metrics, step):
        raise OSError(28, "No space left on device", "metrics.jsonl")

    Tracker.log = full_disk
if FAILS == "raft" and os.environ.get("RANK") == "1":
    from t2i_align.data.online import OnlineSource

    def out_of_memory(self, *args):
        raise RuntimeError("CUDA out of memory (faked)")

    OnlineSource._generate_and_score = out_of_memory
try:
    result = train(cfg)
except Exception:
    if FAILS:
        time.sleep(5)  # the others report what they were told before the launcher stops them
    raise
if draws:
    Path(cfg.output_dir, f"draws{PartialState().process_index}.json").write_text(json.dumps(draws))
params = [p for p in result.unet.parameters() if p.requires_grad]
digest = [round(float(p.detach().double().sum()), 12) for p in params]
Path(cfg.output_dir, f"rank{PartialState().process_index}.txt").write_text(repr(digest))
# The collective timeout the run set (train.ddp_timeout), as the process group holds it
backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
Path(cfg.output_dir, f"timeout{PartialState().process_index}.txt").write_text(str(backend.options._timeout.seconds))
rank, world = PartialState().process_index, PartialState().num_processes
PartialState().destroy_process_group()  # as train/train.py: a finished process could abort at Python's teardown
if os.environ.get("T2I_TEST_DONE"):  # every line ran: a gloo abort after this is teardown's (test_multiprocess.py)
    Path(os.environ["T2I_TEST_DONE"], f"{rank}-of-{world}").write_text("")
