"""FSDP2 on two CPU processes (gloo) through accelerate's own preparation, checkpointing and state-dict gathering,
launched with the shipped configs/accelerate/fsdp.yaml. accelerate enables FSDP only on GPU machines; the training
script lifts that one gate (multiprocess_train.allow_fsdp_on_cpu). Sharded training must take the steps DDP takes."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import save_tiny_pipeline
from helpers import write_rendered_pairs
from test_multiprocess import ENV, SCRIPT, launch, run_launch

CONFIG = SCRIPT.parents[1] / "configs" / "accelerate" / "fsdp.yaml"
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes",
               "2", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]


def launch_fsdp(*overrides: str) -> None:
    run_launch([*FSDP_LAUNCH, *overrides], {**ENV, "T2I_TEST_FSDP_ON_CPU": "1"})


def tiny_run_args(tmp_path, *extra: str, family: str = "sd15"):
    model = save_tiny_pipeline(family, tmp_path / family)
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=8)
    return [f"model.pretrained={model}", f"data.path={data}", "data.resolution=16", "train.batch_size=2",
            "train.log_every=1", "train.checkpoint_every=1", "objective.beta=100", "tracking.wandb=off",
            "tracking.sample_steps=2", "tracking.validation_seeds=1", *extra]


FULL = ["lora.enabled=false", "train.learning_rate=1e-3", "train.max_steps=3"]
# with a warmed-up linear schedule and a gallery mid-run: the engines' full fine-tuning tests (tests/conftest.py)
FULL_LINEAR = [*FULL, "train.lr_scheduler=linear", "train.lr_warmup_steps=1", "tracking.validate_every=2"]
UNET = "unet/diffusion_pytorch_model.safetensors"


def metrics(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def relative_distance(a: dict, b: dict, origin: dict) -> float:
    """||a - b|| / ||b - origin|| over all tensors: how far the two runs ended apart, against how far they moved."""
    apart = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    moved = sum(float((b[k].double() - origin[k].double()).pow(2).sum()) for k in b) ** 0.5
    return apart / moved


def assert_takes_the_ddp_steps(run, ddp, keys=("loss", "grad_norm", "lr")) -> None:
    """The run logged DDP's values step for step (to 1e-4: the engines sum gradients in other orders), learning
    rates included (accelerate steps a prepared schedule once per process, so each engine must too)."""
    engine, base = metrics(run), metrics(ddp)
    assert len(engine) == len(base) > 1
    for key in keys:
        assert [m[key] for m in engine] == pytest.approx([m[key] for m in base], rel=1e-4)


def assert_same_gallery(run, ddp) -> None:
    """The run's last gallery shows DDP's images, pixel for pixel up to a few 8-bit levels (the weights differ by
    float rounding)."""
    names = sorted(p.name for p in (ddp / "gallery" / "images").glob("*.png"))
    assert names and names == sorted(p.name for p in (run / "gallery" / "images").glob("*.png"))
    for name in names:
        a, b = (np.asarray(Image.open(r / "gallery" / "images" / name), dtype=np.int16) for r in (run, ddp))
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, name


def assert_same_adapter(run, ddp, name: str = "pytorch_lora_weights.safetensors") -> None:
    """The exported adapter file holds DDP's tensors, to 1e-3 of their size."""
    a, b = (load_file(r / "final" / name) for r in (run, ddp))
    zero = {k: torch.zeros_like(v) for k, v in b.items()}
    assert a.keys() == b.keys() and relative_distance(a, b, zero) < 1e-3


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_fsdp_full_finetune_takes_the_ddp_steps_and_exports_a_whole_unet(tmp_path, family, request):
    """Full fine-tuning sharded, under a warmed-up linear schedule: the same losses, gradient norms and learning
    rates as DDP, the exported unet/ whole and equal to DDP's (to float rounding: reduce-scatter and all-reduce
    sum in other orders), sharded checkpoints, and the gallery sampled through the sharded UNet (every process
    samples; the main process writes it) showing DDP's images."""
    if family == "sd15":  # the DDP run the DeepSpeed test compares against too
        args, ddp = request.getfixturevalue("ddp_full_run")
    else:
        args, ddp = tiny_run_args(tmp_path, *FULL_LINEAR, family=family), tmp_path / "ddp"
        launch(*args, f"output_dir={ddp}")
    launch_fsdp(*args, f"output_dir={tmp_path / 'fsdp'}")
    assert_takes_the_ddp_steps(tmp_path / "fsdp", ddp)
    assert [m["lr"] for m in metrics(tmp_path / "fsdp")] == pytest.approx([0.0, 1e-3, 5e-4], abs=1e-12)  # each step's
    assert_same_gallery(tmp_path / "fsdp", ddp)
    a, b = load_file(tmp_path / "fsdp" / "final" / UNET), load_file(ddp / "final" / UNET)
    assert a.keys() == b.keys()
    assert relative_distance(a, b, load_file(ddp.parent / family / UNET)) < 1e-2
    step3 = tmp_path / "fsdp" / "checkpoints" / "step-3"
    assert (step3 / "pytorch_model_fsdp_0").is_dir() and (step3 / "optimizer_0").is_dir()
    assert (tmp_path / "fsdp" / "gallery" / "index.html").is_file()


@pytest.mark.slow
def test_fsdp_bf16_differs_from_ddp_bf16_only_by_rounding(tmp_path):
    """bf16 under FSDP2 is accelerate's MixedPrecisionPolicy (bf16 weights in the forward; the gradients reduced in
    fp32 since session 31, bf16 before), under DDP autocast over fp32 weights: not the same arithmetic, so the two
    end apart. They must end within 1.5× of how far bf16 DDP ends from fp32 DDP, i.e. apart by rounding, not by a
    wrong step. (-m slow.)"""
    args = tiny_run_args(tmp_path, *FULL)
    launch_fsdp(*args, "train.mixed_precision=bf16", f"output_dir={tmp_path / 'fsdp16'}")
    launch(*args, "train.mixed_precision=bf16", f"output_dir={tmp_path / 'ddp16'}")
    launch(*args, f"output_dir={tmp_path / 'ddp32'}")
    origin = load_file(tmp_path / "sd15" / UNET)
    fsdp16, ddp16, ddp32 = (load_file(tmp_path / run / "final" / UNET) for run in ("fsdp16", "ddp16", "ddp32"))
    assert relative_distance(fsdp16, ddp16, origin) < 1.5 * relative_distance(ddp16, ddp32, origin)
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "fsdp16"))


def test_fsdp_lora_resume_takes_the_ddp_steps(tmp_path, ddp_lora_run):
    """LoRA sharded, stopped after step 2 and resumed from its sharded checkpoint: step 3 and the exported
    adapter equal a DDP run's. (This caught LoRA's random A drawn differently on each process: DDP hid it by
    broadcasting the main process's weights, FSDP kept each process's own shard.)"""
    args, ddp = ddp_lora_run
    assert_resumed_run_takes_the_ddp_steps(launch_fsdp, args, tmp_path / "fsdp", ddp)


def assert_resumed_run_takes_the_ddp_steps(launch_engine, args, out, ddp) -> None:
    """Under the engine: 2 steps, then resumed to 3; `ddp`: the same args run 3 steps under DDP. The same steps
    and the same adapter."""
    launch_engine(*args, f"output_dir={out}", "train.max_steps=2")
    launch_engine(*args, f"output_dir={out}", "train.max_steps=3", "train.resume=latest")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert_takes_the_ddp_steps(out, ddp)
    assert_same_adapter(out, ddp)


@pytest.mark.slow  # 46 s; methods under FSDP beyond DPO and SePPO: -m slow
def test_fsdp_raft_resumed_inside_a_round_takes_the_ddp_steps(tmp_path):
    """RAFT sharded: each process samples its half of the round's prompts through the sharded UNet (collective
    forwards), the pool is gathered and ranked as under DDP; stopped inside round 1 and resumed from the sharded
    checkpoint and the saved pool, it picks the images DDP picked and ends with DDP's adapter."""
    args = ["model.pretrained=toy", "lora.enabled=true", "objective.name=sft", "raft.enabled=true",
            "raft.prompts=toy:train", "raft.prompts_per_round=4", "raft.k=2", "raft.round_steps=2",
            "raft.sample_steps=2", "raft.top_fraction=0.5", "train.batch_size=2", "train.log_every=1",
            "train.checkpoint_every=1", "train.learning_rate=1e-2", "tracking.wandb=off", "tracking.sample_steps=2",
            "tracking.validation_seeds=1"]
    out = tmp_path / "fsdp"
    launch_fsdp(*args, f"output_dir={out}", "train.max_steps=3")
    launch_fsdp(*args, f"output_dir={out}", "train.max_steps=4", "train.resume=latest")
    launch(*args, f"output_dir={tmp_path / 'ddp'}", "train.max_steps=4")

    def rounds(run):
        return [json.loads(line) for line in (run / "raft_rounds.jsonl").read_text().splitlines()]
    sharded, ddp = rounds(out), rounds(tmp_path / "ddp")
    assert [r["round"] for r in sharded] == [0, 1]
    assert [r["selected"] for r in sharded] == [r["selected"] for r in ddp]
    for a, b in zip(sharded, ddp):
        assert sum(a["scores"], []) == pytest.approx(sum(b["scores"], []), abs=1e-6)
    assert_takes_the_ddp_steps(out, tmp_path / "ddp", keys=("loss",))
    assert_same_adapter(out, tmp_path / "ddp")


@pytest.mark.slow  # 42 s; as above
def test_fsdp_reward_finetuning_with_checkpointed_sampling_takes_the_ddp_steps(tmp_path):
    """LongAlign's reward fine-tuning sharded: gradient-carrying UNet forwards inside the sampler, checkpointed
    (recomputed, so gathered again, inside backward), and the KL anchor through the same sharded UNet with its
    adapters off: the same losses and gradient norms as DDP."""
    args = ["model.pretrained=toy", "lora.enabled=true", "lora.rank=2", "objective.name=reward_backprop",
            "data.kind=prompts", "data.path=toy:train-long", "data.resolution=32",
            "reward_backprop.reward=decomposed-clip", "reward_backprop.reward_options={checkpoint: toy, omega: 0.3}",
            "reward_backprop.num_steps=4", "reward_backprop.grad_mode=strided", "reward_backprop.grad_k=2",
            "reward_backprop.checkpoint=true", "reward_backprop.decode_checkpoint=true", "reward_backprop.kl_weight=1",
            "reward_backprop.guidance_scale=3.0", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
            "train.learning_rate=1e-2", "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1"]
    launch_fsdp(*args, f"output_dir={tmp_path / 'fsdp'}")
    launch(*args, f"output_dir={tmp_path / 'ddp'}")
    assert_takes_the_ddp_steps(tmp_path / "fsdp", tmp_path / "ddp", keys=("loss", "kl", "grad_norm"))
    assert (tmp_path / "fsdp" / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow  # 65-75 s: a method beyond DPO under FSDP, as RAFT, PPD and reward fine-tuning (-m slow)
def test_fsdp_seppo_full_finetune_resumed_takes_the_ddp_steps_and_draws(tmp_path):
    """SePPO's full fine-tune sharded: each snapshot is the policy gathered from its shards (collective) and written
    by the main process; the drawn snapshot is loaded into the unsharded frozen copy (here kept in each process's
    RAM once read: seppo.snapshots_in_memory). Stopped after step 2 and resumed from the sharded checkpoint with
    its pool: the same draws, losses and gradient norms as an uninterrupted DDP run, and the pool's files equal
    DDP's."""
    args = tiny_run_args(tmp_path, *FULL[:-1], "objective.name=seppo", "seppo.snapshot_every=1", "seppo.pool_size=3",
                         "seppo.sample_steps=2")
    fsdp = [*args, f"output_dir={tmp_path / 'fsdp'}", "seppo.snapshots_in_memory=true"]
    launch_fsdp(*fsdp, "train.max_steps=2")
    launch_fsdp(*fsdp, "train.max_steps=3", "train.resume=latest")
    launch(*args, f"output_dir={tmp_path / 'ddp'}", "train.max_steps=3")
    assert [m["step"] for m in metrics(tmp_path / "fsdp")] == [1, 2, 3]
    assert_takes_the_ddp_steps(tmp_path / "fsdp", tmp_path / "ddp")
    draws = [json.loads((tmp_path / run / f"draws{r}.json").read_text()) for run in ("fsdp", "ddp") for r in (0, 1)]
    assert draws[0] == draws[1] == draws[2][-1:] and draws[2] == draws[3]  # the resumed run drew step 3's only
    assert len(set(draws[2])) > 1  # not always the initial model
    pools = [sorted(p.name for p in (tmp_path / run / "reference_pool").iterdir()) for run in ("fsdp", "ddp")]
    assert pools[0] == pools[1] and len(pools[0]) >= 2 and pools[0][0] == "step-0.safetensors"
    origin = load_file(tmp_path / "ddp" / "reference_pool" / "step-0.safetensors")
    assert origin.keys() == load_file(tmp_path / "sd15" / UNET).keys()  # a whole UNet, gathered from the shards
    for name in pools[0][1:]:  # as the full fine-tune's export: equal to float rounding (summed in other orders)
        a, b = (load_file(tmp_path / run / "reference_pool" / name) for run in ("fsdp", "ddp"))
        assert a.keys() == b.keys() and relative_distance(a, b, origin) < 1e-2


@pytest.mark.slow  # 36 s; as above
def test_fsdp_ppd_with_lora_takes_the_ddp_steps_and_exports_the_user_branch(tmp_path):
    """PPD sharded (LoRA and the user branch, users as cross-attention tokens; rows of a user missing from the table
    are left out): the same losses as DDP, and an export whose user branch and LoRA equal DDP's."""
    from test_ppd_loop import write_table, write_user_pairs

    args = tiny_run_args(tmp_path, "lora.enabled=true", "ppd.enabled=true", "train.learning_rate=1e-2",
                         "train.max_steps=3", "tracking.validate_every=2")
    data = write_user_pairs(tmp_path / "users.parquet", users=[1, 2, 3, 99])
    table = write_table(tmp_path / "users.safetensors", [1, 2, 3])
    args += [f"data.path={data}", f"ppd.table={table}"]
    launch_fsdp(*args, f"output_dir={tmp_path / 'fsdp'}")
    launch(*args, f"output_dir={tmp_path / 'ddp'}")
    assert_takes_the_ddp_steps(tmp_path / "fsdp", tmp_path / "ddp", keys=("loss",))
    for name in ("user_branch.safetensors", "pytorch_lora_weights.safetensors"):
        assert_same_adapter(tmp_path / "fsdp", tmp_path / "ddp", name)
