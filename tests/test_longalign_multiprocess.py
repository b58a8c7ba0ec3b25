"""reward_backprop on two CPU processes (gloo, DDP): several gradient-carrying UNet forwards per backward, each
checkpointed (recomputed inside backward), must still all-reduce every LoRA gradient: both ranks end with the
same weights, and the common direction is one file fitted by the main process. With the KL anchor, the reference
(the same DDP-wrapped UNet with its adapters off) runs inside the gradient steps on both ranks."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reward_models.decomposed_clip import load_direction


@pytest.mark.parametrize("kl_weight", [pytest.param(0, marks=pytest.mark.slow), 1])  # 1: 0's path and the KL
def test_two_process_reward_backprop_with_checkpointed_gradient_steps(tmp_path, kl_weight):
    out = tmp_path / "run"
    script = Path(__file__).with_name("multiprocess_train.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           "model.pretrained=toy", "lora.enabled=true", "lora.rank=2", "objective.name=reward_backprop",
           "data.kind=prompts", "data.path=toy:train-long", "data.resolution=32",
           "reward_backprop.reward=decomposed-clip", "reward_backprop.reward_options={checkpoint: toy, omega: 0.3}",
           "reward_backprop.num_steps=4", "reward_backprop.grad_mode=strided", "reward_backprop.grad_k=2",
           "reward_backprop.checkpoint=true", "reward_backprop.decode_checkpoint=true",
           "reward_backprop.guidance_scale=3.0", f"output_dir={out}", "train.batch_size=2", "train.max_steps=2",
           "train.log_every=1", "train.learning_rate=1e-2", "tracking.wandb=off", "tracking.sample_steps=2",
           "tracking.validation_seeds=1", f"reward_backprop.kl_weight={kl_weight}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["grad_norm"] > 0 for r in records)
    assert ("kl" in records[0]) == (kl_weight > 0)
    rank0, rank1 = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    assert rank0 == rank1  # the two ranks saw different prompts and noise: equal only if gradients were synced
    lora_b = ast.literal_eval(rank0)[1::2]  # [A, B, A, B, ...] per adapted layer; B starts at zero
    assert any(abs(b) > 0 for b in lora_b)
    _, meta = load_direction(out / "reward_direction.safetensors")
    assert meta["num_prompts"] == "300"
    assert not list(out.glob("*.tmp"))
