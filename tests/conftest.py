"""Test-wide settings: never reach a hub, never prompt W&B, and keep torch to one thread.

Tiny models run far faster single-threaded on a shared 2-core machine (thread contention dominates).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)
