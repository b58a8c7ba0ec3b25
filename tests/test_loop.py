"""The shared training loop end to end on tiny random SD1.5 / SDXL pipelines and rendered toy pairs."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import (logged_losses, loop_cfg, one_torch_thread, plain_lora_kwargs, save_tiny_pipeline,  # noqa: F401
                     write_rendered_pairs)
from t2i_align.checkpoints import CheckpointMismatch
from t2i_align.errors import UserError
from t2i_align.loop import NonFiniteError, train


def test_lora_dpo_runs_logs_and_exports(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "lora.rank=4", "train.max_steps=3",
                       "train.log_every=1", "objective.beta=100"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # step 1 is computed before any update: B = 0, so the reference (adapters off) is the policy bit for bit
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=1e-7)
    for key in ("implicit_acc", "mse_w", "ref_mse_l", "grad_norm", "lr"):
        assert key in records[0]
    assert (out / "gallery" / "index.html").is_file() and (out / "config.yaml").is_file()
    with safe_open(str(out / "final" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(re.fullmatch(r"unet\..+\.lora_[AB]\.weight", k) for k in keys)  # the adapters alone
    assert sum(k.endswith(".lora_A.weight") for k in keys) * 2 == len(keys)  # an A and a B for each layer


def test_exported_lora_reloads_exactly_with_conv_and_attention_targets(tiny_model, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    targets = "lora.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2,proj_in,proj_out]"
    result = train(loop_cfg(tiny_model, pairs, tmp_path / "run", "lora.enabled=true", targets, "train.max_steps=2",
                        "objective.beta=100", "lora.init=default"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.load_lora_weights(str(result.final), **plain_lora_kwargs())
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        trained = result.unet(x, t, h).sample
        loaded = pipe.unet(x, t, h).sample
        base = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet(x, t, h).sample
    assert not torch.allclose(trained, base, atol=1e-6)
    assert torch.allclose(loaded, trained, atol=1e-6)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate refuses a second Accelerator with another mixed precision in one process: reset before and after."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_lora_on_a_bf16_base_unet_trains_and_exports(tiny_model, pairs, tmp_path, fresh_accelerate_state):
    """model.cast_base_unet: the frozen base in bf16 beside fp32 adapters under bf16 autocast; the export is the
    adapters alone, which reload onto the plain fp32 base."""
    from diffusers import StableDiffusionPipeline

    result = train(loop_cfg(tiny_model, pairs, tmp_path / "run", "lora.enabled=true", "train.max_steps=2",
                        "lora.init=default", "train.mixed_precision=bf16", "model.weight_dtype=bf16",
                        "model.cast_base_unet=true", "train.log_every=1"))
    dtypes = {(p.requires_grad, p.dtype) for p in result.unet.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses)) and abs(losses[0] - np.log(2)) < 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.load_lora_weights(str(result.final), **plain_lora_kwargs())
    assert pipe.unet.peft_config and {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet(x, t, h).sample
        assert not torch.allclose(pipe.unet(x, t, h).sample, base, atol=1e-6), "the trained adapters took"


def test_the_official_sdxl_full_recipe_settings_train(tiny_model, pairs, tmp_path):
    """configs/sdxl/dpo_full.yaml's optimizer settings on the tiny model: Adafactor at a fixed LR with its own
    update clipping (no parameter scaling, no relative step), the gradient clipped at 1.0 as well (the official
    train.py clips unless --use_adafactor is passed), the reference kept on the CPU between calls. DPO's first
    loss is ln 2 (policy = reference) and the UNet moves."""
    from diffusers import StableDiffusionPipeline

    from t2i_align.optim import make_optimizer

    cfg = loop_cfg(tiny_model, pairs, tmp_path / "run", "lora.enabled=false", "train.optimizer=adafactor",
               "train.max_grad_norm=1.0", "train.offload_reference=true", "train.max_steps=2", "train.log_every=1")
    adafactor = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.train, lr=1e-3).defaults
    assert (adafactor["lr"], adafactor["scale_parameter"], adafactor["relative_step"], adafactor["clip_threshold"],
            adafactor["weight_decay"]) == (1e-3, False, False, 1.0, cfg.train.weight_decay)
    final = train(cfg).final
    assert abs(logged_losses(tmp_path / "run")[0] - np.log(2)) < 1e-4
    before = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet.state_dict()
    after = StableDiffusionPipeline.from_pretrained(str(final)).unet.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in after.items())


def test_full_sft_exports_a_pipeline_folder(tiny_model, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    final = train(loop_cfg(tiny_model, pairs, out, "objective.name=sft", "train.max_steps=2")).final
    pipe = StableDiffusionPipeline.from_pretrained(str(final))
    before = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet.state_dict()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "full fine-tune did not change the exported UNet"


def test_sft_with_min_snr_weights_logs_a_weighted_loss_below_its_mse(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "objective.name=sft", "objective.snr_gamma=0.01", "lora.enabled=true",
               "train.max_steps=2", "train.log_every=1"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < row["loss"] < row["mse"] for row in rows)  # weights <= 1, mostly << 1


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_model, pairs, tmp_path):
    common = ("lora.enabled=true", "train.log_every=1", "train.checkpoint_every=2", "objective.beta=100")
    full = tmp_path / "full"
    train(loop_cfg(tiny_model, pairs, full, *common, "train.max_steps=4"))
    part = tmp_path / "part"
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=2"))
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=4", "train.resume=latest"))
    assert logged_losses(part) == pytest.approx(logged_losses(full), abs=1e-6)
    assert [p.name for p in sorted((part / "checkpoints").iterdir())] == ["step-2", "step-4"]
    from safetensors import safe_open

    with safe_open(str(part / "checkpoints" / "step-2" / "model.safetensors"), framework="pt") as f:
        assert f.keys() and all(".lora_" in k for k in f.keys())  # adapters only, not the frozen UNet
    with pytest.raises(RuntimeError, match="other LoRA or PPD settings"):
        train(loop_cfg(tiny_model, pairs, part, *common, "lora.rank=2", "train.max_steps=6", "train.resume=latest"))
    # narrower targets were a subset, loaded with strict=False: the optimizer's ValueError came as a traceback
    with pytest.raises(CheckpointMismatch, match=r"holds \d+ weights this run does not train.*other LoRA or PPD"):
        train(loop_cfg(tiny_model, pairs, part, *common, "lora.target_modules=[to_q]", "train.max_steps=6",
                   "train.resume=latest"))
    with pytest.raises(CheckpointMismatch, match=r"does not hold \d+ weights this run trains.*full fine-tune"):
        train(loop_cfg(tiny_model, pairs, part, "train.checkpoint_every=2", "train.max_steps=6", "train.resume=latest"))
    # a checkpoint past max_steps exported its step-4 weights labelled step 3
    with pytest.raises(UserError, match="at step 4, past train.max_steps=3"):
        train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=3", "train.resume=latest"))


def test_the_last_step_is_checkpointed_so_a_run_can_be_continued(tiny_model, pairs, tmp_path):
    """With checkpoint_every=2 a 3-step run kept only step-2: training on to step 5 redid step 3."""
    common = ("lora.enabled=true", "train.log_every=1", "train.checkpoint_every=2", "objective.beta=100")
    full, part = tmp_path / "full", tmp_path / "part"
    train(loop_cfg(tiny_model, pairs, full, *common, "train.max_steps=5"))
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=3"))
    assert [p.name for p in sorted((part / "checkpoints").iterdir())] == ["step-2", "step-3"]
    train(loop_cfg(tiny_model, pairs, part, *common, "train.max_steps=5", "train.resume=latest"))
    assert len(logged_losses(part)) == 5 and logged_losses(part) == pytest.approx(logged_losses(full), abs=1e-6)


def test_non_finite_loss_skips_steps_then_stops(tiny_model, pairs, tmp_path, monkeypatch):
    from t2i_align.objectives.sft import SFT

    original = SFT.compute_loss

    def nan_loss(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(SFT, "compute_loss", nan_loss)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train(loop_cfg(tiny_model, pairs, out, "objective.name=sft", "train.max_steps=10",
                   "train.max_nonfinite_steps=3", "train.checkpoint_every=1"))
    # Skipped steps never touched the weights, so the checkpoints written meanwhile hold the initial UNet.
    from safetensors.torch import load_file
    from diffusers import UNet2DConditionModel

    saved = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    initial = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet").state_dict()
    assert all(torch.equal(saved[k], initial[k]) for k in initial)


def test_one_skipped_step_leaves_its_windows_other_metrics_readable(tiny_model, pairs, tmp_path, monkeypatch):
    """A non-finite step (skipped, counted) made every metric of its log_every window NaN: nine trained steps
    gone from the curves at the default window of 10 for one that did not train."""
    from t2i_align.objectives.sft import SFT

    original, calls = SFT.compute_loss, []

    def second_nan(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), {k: float("nan") for k in metrics}) if len(calls) == 2 else (loss, metrics)

    monkeypatch.setattr(SFT, "compute_loss", second_nan)
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "objective.name=sft", "train.max_steps=4", "train.log_every=4"))
    (line,) = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["steps_skipped_nonfinite"] == 1 and math.isfinite(line["loss"]) and math.isfinite(line["mse"])


def test_checkpoint_is_refused_for_non_finite_weights(tmp_path):
    from accelerate import Accelerator

    from t2i_align.checkpoints import list_checkpoints, save_checkpoint

    param = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    assert save_checkpoint(Accelerator(cpu=True), tmp_path, 5, keep=2, params=[param]) is None
    assert list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("time_ids, first", [("fixed", [16, 16, 0, 0, 16, 16]), ("per_image", [24, 24, 0, 0, 16, 16])])
def test_sdxl_lora_dpo_step(tmp_path, monkeypatch, time_ids, first):
    """data.time_ids reaches the batches: fixed, as the pipeline samples; per_image, the 24 px render's size before
    the resize to 16 (square: no crop)."""
    import t2i_align.batches as batches

    seen, original = [], batches._time_ids
    monkeypatch.setattr(batches, "_time_ids", lambda *a: seen.append(original(*a)) or seen[-1])
    model = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=4, size=24)
    out = tmp_path / "run"
    train(loop_cfg(model, data, out, "lora.enabled=true", "train.max_steps=1", "train.log_every=1",
               "model.weight_dtype=fp32", "data.flip=joint", f"data.time_ids={time_ids}"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["loss"])
    assert seen and all(row == first for ids in seen for row in ids.tolist())


def test_a_kill_during_checkpoint_save_leaves_no_checkpoint(tiny_model, pairs, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from t2i_align.checkpoints import list_checkpoints, resolve_resume

    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=2", "train.checkpoint_every=2"))

    def killed(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=4", "train.checkpoint_every=2",
                   "train.resume=latest"))
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert resolve_resume(out, "latest").name == "step-2"
    assert not list((out / "checkpoints").glob(".step-*"))  # Ctrl-C mid-write: its half-written state is removed


def test_resuming_from_a_named_folder_without_its_marker_is_refused(tmp_path):
    """A checkpoint folder named explicitly but never completed (no marker: killed while saving) is refused with
    what to do, not loaded half-written; a missing one is refused as missing."""
    from t2i_align.checkpoints import MARKER, resolve_resume

    half = tmp_path / "run" / "checkpoints" / "step-3"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half written")
    with pytest.raises(FileNotFoundError, match=f"step-3' is not a complete checkpoint folder \\(no {MARKER}\\); "
                                                "use train.resume=latest"):
        resolve_resume(tmp_path / "run", str(half))
    with pytest.raises(FileNotFoundError, match="step-4' does not exist"):
        resolve_resume(tmp_path / "run", str(half.parent / "step-4"))
    (half / MARKER).write_text("{}")
    assert resolve_resume(tmp_path / "run", str(half)) == half


def test_corrupt_rows_are_skipped_and_counted(tiny_model, tmp_path):
    import pyarrow.parquet as pq

    from t2i_align.toy.pairs import write_parquet as write

    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=8)
    rows = pq.read_table(data).to_pylist()
    rows[1]["jpg_0"] = b"\xff\xd8 not a jpeg"
    rows[5]["jpg_1"] = b""
    write(rows, data)
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, data, out, "lora.enabled=true", "train.max_steps=4", "train.log_every=4"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # 4 steps of 2 rows read the 8 rows once: both corrupt rows met, each in a batch with a usable row
    assert record["data_rows_skipped"] == 2 and record["data_batches_skipped"] == 0 and np.isfinite(record["loss"])


def test_data_whose_every_image_is_corrupt_stops_with_a_message(tiny_model, tmp_path):
    """Every row undecodable: each batch was replaced by the next for ever (the run hung); a whole epoch of
    unusable batches in a row now stops it, saying what to check."""
    import pyarrow.parquet as pq

    from t2i_align.errors import UserError
    from t2i_align.toy.pairs import write_parquet as write

    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=8)
    rows = pq.read_table(data).to_pylist()
    for row in rows:
        row["jpg_0"] = b"not a jpeg"
    write(rows, data)
    with pytest.raises(UserError, match="no usable row in 5 batches in a row.*Check data.path"):
        train(loop_cfg(tiny_model, data, tmp_path / "run", "lora.enabled=true", "train.max_steps=2"))


def test_wandb_offline_run_contains_the_gallery_images(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, "lora.enabled=true", "train.max_steps=1", "tracking.wandb=offline"))
    media = list((out / "wandb").glob("offline-run-*/files/media/images/gallery/*.png"))
    assert media, sorted(str(p) for p in (out / "wandb").rglob("*"))[:20]


def test_a_resume_continues_its_w_and_b_run_and_a_fresh_start_begins_another(tiny_model, pairs, tmp_path):
    out, common = tmp_path / "run", ("lora.enabled=true", "train.checkpoint_every=2", "tracking.wandb=offline")
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    first = (out / "wandb_run_id").read_text().strip()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=3", "train.resume=latest"))
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    # W&B names a run's folder offline-run-DATE_TIME-ID, with -1 added when both start in the same second
    named = rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?"
    assert len(runs) == 2 and all(re.fullmatch(named, name) for name in runs), runs
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=1"))  # a fresh start: a new W&B run
    again = (out / "wandb_run_id").read_text().strip()
    assert again != first and any((out / "wandb").glob(f"offline-run-*-{again}"))
    assert [p.read_text().strip() for p in out.glob("previous-*/wandb_run_id")] == [first]


def test_a_resume_from_an_earlier_checkpoint_keeps_the_abandoned_runs_w_and_b_id(tiny_model, pairs, tmp_path):
    """The new run's id was written over the old one's before the abandoned timeline was set aside with it."""
    out, common = tmp_path / "run", ("lora.enabled=true", "train.checkpoint_every=1", "tracking.wandb=offline")
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2"))
    first = (out / "wandb_run_id").read_text().strip()
    train(loop_cfg(tiny_model, pairs, out, *common, "train.max_steps=2",
                   f"train.resume={out / 'checkpoints' / 'step-1'}"))
    aside = next((out / "checkpoints").glob("abandoned-*"))
    assert (aside / "wandb_run_id").read_text().strip() == first
    assert (out / "wandb_run_id").read_text().strip() not in ("", first)


def test_only_a_resume_from_the_folders_newest_checkpoint_continues_its_w_and_b_run(tmp_path):
    from t2i_align.checkpoints import MARKER
    from t2i_align.tracking import continued_run_id

    for folder, step in ((tmp_path, 2), (tmp_path, 4), (tmp_path / "other", 6)):
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (folder / "checkpoints" / f"step-{step}" / MARKER).write_text(json.dumps({"step": step}))
    newest, earlier = tmp_path / "checkpoints" / "step-4", tmp_path / "checkpoints" / "step-2"
    (tmp_path / "other" / "wandb_run_id").write_text("other1\n")
    assert continued_run_id(tmp_path, newest) is None  # no id recorded (W&B was off)
    (tmp_path / "wandb_run_id").write_text("abc123\n")
    assert continued_run_id(tmp_path, newest) == "abc123"
    assert continued_run_id(tmp_path, None) is None      # a fresh start
    assert continued_run_id(tmp_path, earlier) is None   # the W&B run holds steps this timeline abandons
    assert continued_run_id(tmp_path / "other", newest) is None  # another folder's checkpoint: a fork
    assert continued_run_id(tmp_path / "other", tmp_path / "other" / "checkpoints" / "step-6") == "other1"
    (tmp_path / "final").mkdir()  # exported at step 5 (the last logged), after the newest checkpoint
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5}) + "\n")
    assert continued_run_id(tmp_path, newest) is None  # the W&B run holds step 5, which this run abandons


def test_fp16_overflow_steps_do_not_count_towards_stopping_but_nan_losses_do():
    from types import SimpleNamespace

    from t2i_align.loop import _counts_as_failure

    plain = SimpleNamespace(scaler=None, distributed_type="MULTI_GPU", mixed_precision="bf16", num_processes=1)
    scaled = SimpleNamespace(scaler=object(), distributed_type="NO", mixed_precision="fp16", num_processes=1)
    deepspeed_fp16 = SimpleNamespace(scaler=None, distributed_type="DEEPSPEED", mixed_precision="fp16",
                                     num_processes=1)  # DeepSpeed's own scaler
    inf, finite_loss, nan_loss = float("inf"), [{"loss": 0.7}], [{"loss": float("nan")}]
    assert _counts_as_failure(plain, inf, finite_loss)          # no loss scaling: any non-finite gradient
    for accelerator in (scaled, deepspeed_fp16):
        assert not _counts_as_failure(accelerator, inf, finite_loss)  # the scaler calibrating: expected, skipped
        assert _counts_as_failure(accelerator, inf, nan_loss)         # the loss itself is broken
    assert not _counts_as_failure(plain, 1.5, finite_loss)
    # Two processes, the other one's loss NaN (it adds 0 to the sum of "finite" flags): this one counts it too,
    # or the other would stop alone while this one waits for it
    pair = SimpleNamespace(scaler=object(), distributed_type="MULTI_GPU", mixed_precision="fp16", num_processes=2,
                           device=torch.device("cpu"), reduce=lambda t, reduction: t + 0.0)
    assert _counts_as_failure(pair, inf, finite_loss)
    pair.reduce = lambda t, reduction: t * 2  # both finite
    assert not _counts_as_failure(pair, inf, finite_loss)


def test_logged_counts_of_each_processs_data_are_summed_over_processes():
    from types import SimpleNamespace

    from t2i_align.resume import summed as _summed

    seen = []

    def reduce(t, reduction):
        seen.append(reduction)
        return t + torch.tensor([1.0, 4.0], dtype=t.dtype)  # the other process's counts

    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    assert _summed(two, {"data_rows_skipped": 2.0, "prompts_truncated": 0.0}) == {"data_rows_skipped": 3.0,
                                                                                    "prompts_truncated": 4.0}
    assert seen == ["sum"]
    assert _summed(SimpleNamespace(num_processes=1), {"data_rows_skipped": 2.0}) == {"data_rows_skipped": 2.0}


def test_cached_runs_reuse_the_cache_and_are_reproducible(tiny_model, pairs, tmp_path):
    cache = tmp_path / "cache"
    common = ("lora.enabled=true", "train.max_steps=2", "train.log_every=1", f"data.cache_dir={cache}")
    train(loop_cfg(tiny_model, pairs, tmp_path / "a", *common, "data.cache=true"))
    built = sorted(p.name for p in cache.iterdir())
    train(loop_cfg(tiny_model, pairs, tmp_path / "b", *common, "data.cache=true"))
    assert sorted(p.name for p in cache.iterdir()) == built and len(built) == 1  # reused, not rebuilt
    assert logged_losses(tmp_path / "a") == pytest.approx(logged_losses(tmp_path / "b"), abs=1e-6)
    assert abs(logged_losses(tmp_path / "a")[0] - np.log(2)) < 1e-4


def test_image_caption_data_trains_read_every_step_or_cached(tiny_model, pairs, tmp_path):
    """LongAlign stage 1's data (data.kind=captions: each pair's winner as an image-caption row) through the loop,
    uncached and cached; a second cached run reuses the cache. The cache's latents are VAE posterior samples
    drawn at caching time, so the cached losses differ from the uncached ones, not their scale."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pairs).to_pylist()
    captions = tmp_path / "captions.parquet"
    pq.write_table(pa.Table.from_pylist([{"caption": r["caption"], "jpg": r["jpg_0"]} for r in table]), captions)
    common = ("objective.name=sft", "data.kind=captions", "lora.enabled=true", "train.max_steps=2",
              "train.log_every=1", f"data.cache_dir={tmp_path / 'cache'}")
    losses = {}
    for run, cache in (("plain", "false"), ("cached", "true"), ("again", "true")):
        train(loop_cfg(tiny_model, captions, tmp_path / run, *common, f"data.cache={cache}"))
        losses[run] = logged_losses(tmp_path / run)
    (folder,) = (tmp_path / "cache").iterdir()  # built once, then reused
    marker = json.loads((folder / "complete.json").read_text())
    assert marker["stats_kind"] == "CaptionStats" and marker["pairs"] == len(table)
    assert losses["cached"] == pytest.approx(losses["again"], abs=1e-6) and len(losses["plain"]) == 2
    assert abs(np.mean(losses["cached"]) - np.mean(losses["plain"])) < 0.5 * np.mean(losses["plain"])


def test_two_micro_batches_give_the_gradient_of_one_batch_twice_their_size(tiny_model, pairs, tmp_path,
                                                                             monkeypatch):
    """train.grad_accum=2 at batch 2 takes the step of batch 4 on the same rows: the loss is a mean over rows,
    so each micro-batch's is divided by grad_accum. Noising made a function of the latents (no random draw), so
    the two runs differ only in how the rows are split; SFT, full fine-tuning, one step."""
    import t2i_align.diffusion as diffusion
    import t2i_align.loop as loop

    def noised(scheduler, latents, generator=None, **kw):
        t = torch.full((len(latents),), 500, dtype=torch.long, device=latents.device)
        return 0.6 * latents + 0.4 * latents.flip(-1), t, latents.flip(-2)

    step, grads = loop._optimizer_step, []

    def recording_step(accelerator, unet, optimizer, lr_sched, params, max_grad_norm):
        grads.append([p.grad.detach().clone() for p in params])
        return step(accelerator, unet, optimizer, lr_sched, params, max_grad_norm)

    monkeypatch.setattr(diffusion, "noised", noised)
    monkeypatch.setattr(loop, "_optimizer_step", recording_step)
    for batch, accum in ((4, 1), (2, 2)):
        train(loop_cfg(tiny_model, pairs, tmp_path / f"b{batch}", "objective.name=sft", "train.max_steps=1",
                   f"train.batch_size={batch}", f"train.grad_accum={accum}", "data.prompt_dropout=0"))
    whole, split = grads  # one step each
    assert any(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
