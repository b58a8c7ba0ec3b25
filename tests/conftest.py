"""Test-wide settings: never reach a hub, never prompt W&B, and keep torch to one thread.

Tiny models run far faster single-threaded on a shared 2-core machine (thread contention dominates).
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

from helpers import save_tiny_pipeline, write_rendered_pairs  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ddp_lora_run(tmp_path_factory):
    """A 3-step LoRA DPO run under DDP on two processes, the reference that the FSDP resume and the two-machine
    tests both compare against (a launch costs ~15 s here, mostly imports): (its overrides, its output_dir)."""
    from test_fsdp import tiny_run_args
    from test_multiprocess import launch

    root = tmp_path_factory.mktemp("ddp-lora")
    args = tiny_run_args(root, "lora.enabled=true", "train.learning_rate=1e-2")
    launch(*args, f"output_dir={root / 'ddp'}", "train.max_steps=3")
    return args, root / "ddp"


@pytest.fixture(scope="session")
def ddp_full_run(tmp_path_factory):
    """A 3-step full fine-tune under DDP on two processes (linear schedule after a 1-step warm-up, a gallery at
    step 2), the reference of the FSDP and DeepSpeed full fine-tuning tests: (its overrides, its output_dir)."""
    from test_fsdp import FULL_LINEAR, tiny_run_args
    from test_multiprocess import launch

    root = tmp_path_factory.mktemp("ddp-full")
    args = tiny_run_args(root, *FULL_LINEAR)
    launch(*args, f"output_dir={root / 'ddp'}")
    return args, root / "ddp"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random SD1.5 pipeline folder, one per test module."""
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 rendered toy pairs (winner: the captioned scene), one file per test module."""
    return write_rendered_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet")
