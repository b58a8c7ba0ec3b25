"""The shipped `accelerate launch --config_file` files parse with accelerate's own loader, as the engine named."""
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name, engine", [("ddp", "MULTI_GPU"), ("ddp_multinode", "MULTI_GPU"), ("fsdp", "FSDP"),
                                          ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_config_files_load(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert cfg.distributed_type.name == engine
    assert cfg.mixed_precision == "no" and not cfg.use_cpu  # train.mixed_precision decides (next test)
    if engine == "FSDP":  # FSDP2 (the loop refuses 1), its state saved sharded (resumable)
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_reshard_after_forward"]
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if engine == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("launcher, run, refused", [("no", "fp16", False), ("bf16", "bf16", False),
                                                     ("bf16", "fp16", True), ("fp16", "no", True)])
def test_a_launcher_asking_for_another_precision_is_refused(tmp_path, monkeypatch, launcher, run, refused):
    """accelerate prefers the Accelerator's argument (train.mixed_precision) to `accelerate launch
    --mixed_precision` or a launch file's value, silently: another value there is refused before anything loads
    (the shipped launch files once said bf16 beside run configs in fp16). The launcher's "no" is its default."""
    from t2i_align.config import load_config
    from t2i_align.engine_checks import check_launcher_precision
    from t2i_align.errors import UserError
    from t2i_align.loop import train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(None, [f"train.mixed_precision={run}", "tracking.wandb=off", f"output_dir={tmp_path}"])
    if not refused:
        check_launcher_precision(cfg)
        return
    with pytest.raises(UserError, match=f"asks for mixed precision '{launcher}'.*train.mixed_precision='{run}'.*set "
                                        f"train.mixed_precision={launcher}, or launch with --mixed_precision no"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # refused before the run wrote anything


@pytest.mark.parametrize("engine, device, refused", [("NO", "cpu", True), ("MULTI_CPU", "cpu", True),
                                                    ("NO", "cuda", False)])
def test_fp16_mixed_precision_on_a_cpu_is_refused_at_start(engine, device, refused):
    """On a CPU accelerate turns fp16 autocast off silently: the shipped fp16 configs then failed at the first step
    ("expected m1 and m2 to have the same dtype"), after the earlier run had been set aside."""
    from types import SimpleNamespace

    import torch

    from t2i_align.config import load_config
    from t2i_align.engine_checks import configure_engine
    from t2i_align.errors import UserError

    cfg = load_config(None, ["train.mixed_precision=fp16", "model.weight_dtype=fp16"])
    accelerator = SimpleNamespace(distributed_type=engine, device=torch.device(device))
    if refused:
        with pytest.raises(UserError, match="fp16 needs a GPU.*train.mixed_precision=bf16 model.weight_dtype=bf16"):
            configure_engine(accelerator, cfg, True)
    else:
        configure_engine(accelerator, cfg, True)  # a GPU runs fp16 autocast: no error


def test_fsdp_reduces_half_precision_gradients_in_fp32():
    """accelerate's bf16 / fp16 FSDP policy reduce-scattered every micro-batch's gradients in that precision (DDP
    reduces fp32 ones); a policy of the accelerate config's own choosing is kept, as is fp32."""
    from types import SimpleNamespace

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from t2i_align.engine_checks import _reduce_in_fp32

    for low in (torch.bfloat16, torch.float16):
        plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(low, low, low))
        _reduce_in_fp32(plugin)
        assert plugin.mixed_precision_policy == MixedPrecisionPolicy(low, torch.float32, low)
    for kept in (MixedPrecisionPolicy(torch.bfloat16, torch.float16), MixedPrecisionPolicy(), None):
        plugin = SimpleNamespace(mixed_precision_policy=kept)
        _reduce_in_fp32(plugin)
        assert plugin.mixed_precision_policy is kept


@pytest.mark.parametrize("version, overrides, message", [
    (1, [], "FSDP version 1 is not supported.*fsdp_version: 2"),
    (2, ["objective.name=seppo", "lora.enabled=true"],
     "'seppo' with adapters .* does not run under FSDP.*configs/accelerate/ddp.yaml.*lora.enabled=false"),
    (2, ["train.compile=true"], "torch.compile .* is not supported under FSDP"),
    (2, ["raft.enabled=true", "objective.name=sft", "raft.prompts=toy:train", "raft.prompts_per_round=3"],
     r"prompts_per_round \(3\) must divide evenly over the 2 processes"),
    (2, ["lora.enabled=true", "model.cast_base_unet=true", "model.weight_dtype=bf16", "train.mixed_precision=bf16"],
     "model.cast_base_unet is not supported under FSDP"),
    # SDXL's full fine-tune recipe, the example launch of fsdp.yaml: Adafactor failed at its first step
    (2, ["train.optimizer=adafactor"], "train.optimizer=adafactor does not run under FSDP.*train.optimizer=adamw"),
    (2, ["train.optimizer=adamw8bit"], "train.optimizer=adamw8bit does not run under FSDP.*bitsandbytes reads raw"),
])
def test_fsdp_refuses_what_it_cannot_run_before_loading_anything(tmp_path, monkeypatch, version, overrides, message):
    """FSDP1, and what does not run sharded (t2i_align.engine_checks.check_fsdp), stop at start with what to use.
    A stand-in accelerator of accelerate's FSDP type: the model path does not exist, so reaching the loading fails
    otherwise. (FSDP2 itself is run on two CPU processes in tests/test_fsdp.py.)"""
    import accelerate
    from accelerate.utils import DistributedType

    from t2i_align.config import load_config
    from t2i_align.errors import UserError
    from t2i_align.loop import train

    class FsdpAccelerator:
        distributed_type = DistributedType.FSDP
        num_processes = 2

        def __init__(self, dynamo_backend=None, **kwargs):
            self.state = type("State", (), {"fsdp_plugin": type("Plugin", (), {"fsdp_version": version})(),
                                            "dynamo_plugin": type("Dynamo", (), {"backend": dynamo_backend or "NO"})})()

    monkeypatch.setattr(accelerate, "Accelerator", FsdpAccelerator)
    if "train.optimizer=adamw8bit" in overrides:  # past the config's bitsandbytes check (a GPU-only install)
        import t2i_align.config.sections as sections

        monkeypatch.setattr(sections, "_installed", lambda name: True)
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.wandb=off", f"model.pretrained={tmp_path}/none",
                             *overrides])
    with pytest.raises(UserError, match=message):
        train(cfg)


def test_fsdp_activation_checkpointing_and_accelerates_own_accumulation_are_refused():
    """accelerate's FSDP activation checkpointing recomputes blocks without their random state (LoRA dropout drew
    other masks in the backward: the gradient norm differed from the plain run's, found by running two processes);
    accelerate's own accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) divided the loss a second time."""
    from types import SimpleNamespace

    import torch

    from t2i_align.config import load_config
    from t2i_align.engine_checks import configure_engine
    from t2i_align.errors import UserError

    cfg = load_config(None, [])
    plugin = SimpleNamespace(fsdp_version=2, activation_checkpointing=True)
    fsdp = SimpleNamespace(distributed_type="FSDP", device=torch.device("cpu"), num_processes=2,
                           state=SimpleNamespace(fsdp_plugin=plugin, dynamo_plugin=SimpleNamespace(backend="NO")))
    with pytest.raises(UserError, match="fsdp_activation_checkpointing is not supported.*model.gradient_checkpointing"):
        configure_engine(fsdp, cfg, True)
    plain = SimpleNamespace(distributed_type="MULTI_GPU", device=torch.device("cpu"), gradient_accumulation_steps=4)
    with pytest.raises(UserError, match="gradient accumulation over 4 steps.*train.grad_accum=4"):
        configure_engine(plain, cfg, True)
    configure_engine(SimpleNamespace(distributed_type="MULTI_GPU", device=torch.device("cpu"),
                                     gradient_accumulation_steps=1), cfg, True)


class PastTheChecks(Exception):
    """Raised by the stand-in accelerator once the run reaches loading."""


def _deepspeed_train(monkeypatch, ds: dict, args):
    """train() under a stand-in accelerator of accelerate's DeepSpeed type with DeepSpeed config `ds`."""
    import accelerate
    from accelerate.utils import DistributedType

    from t2i_align.config import load_config
    from t2i_align.loop import train

    class DeepSpeedAccelerator:
        distributed_type = DistributedType.DEEPSPEED
        num_processes, is_main_process = 1, True

        def wait_for_everyone(self):
            pass

        def print(self, *args, **kwargs):
            pass

        def __init__(self, **kwargs):
            self.state = type("State", (), {"deepspeed_plugin": type("Plugin", (), {"deepspeed_config": ds})()})()

        @property
        def device(self):  # first read when loading starts, after every check
            raise PastTheChecks

    monkeypatch.setattr(accelerate, "Accelerator", DeepSpeedAccelerator)
    # the defaults name no pair data: go on to loading (where the stand-in stops) past the data check
    monkeypatch.setattr("t2i_align.data.sources.check_data_files", lambda cfg: None)
    train(load_config(None, ["tracking.wandb=off", "model.pretrained=no/such/model", *args]))


@pytest.mark.parametrize("ds, overrides, message", [
    ({"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}, [], "gradient_accumulation_steps is 4.*"
     "train.grad_accum=4"),
    ({"gradient_accumulation_steps": 1, "gradient_clipping": 1.0}, ["train.max_grad_norm=0"], "set them equal"),
    ({"zero_optimization": {"stage": 3}}, [], "ZeRO stage 3 .* is not supported"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, [], "parameter offload 'cpu'"),
    ({"gradient_accumulation_steps": 1}, ["train.optimizer=adafactor"], "adafactor under DeepSpeed ZeRO-2 steps on"),
    # found by running: accelerate swapped in DeepSpeedCPUAdam (betas 0.9/0.999, eps 1e-8); a None norm failed the
    # first step; channels_last failed in the engine's weight broadcast; a JSON "bf16 enabled" trained in bf16
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, [], "offload_optimizer \\('cpu'\\)"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, [], "compute_grad_norm to false"),
    ({}, ["model.channels_last=true"], "model.channels_last is not supported under DeepSpeed"),
    ({"bf16": {"enabled": True}}, [], "trains in 'bf16'.*train.mixed_precision='no'.*\"auto\""),
])
def test_deepspeed_refuses_its_own_accumulation_and_another_clipping(tmp_path, monkeypatch, ds, overrides, message):
    """DeepSpeed's own accumulation would divide the loss a second time, the engine clips at its own threshold, and
    ZeRO-3 / parameter offload partition the weights the loop calls directly (t2i_align.engines): all refused at
    start. (tests/test_deepspeed.py runs the engine itself.)"""
    from t2i_align.errors import UserError

    with pytest.raises(UserError, match=message):
        _deepspeed_train(monkeypatch, ds, [f"output_dir={tmp_path}", *overrides])


def test_deepspeed_bf16_runs_skip_steps_with_non_finite_gradients(tmp_path, monkeypatch):
    """Before deepspeed PR #8035 bf16 ZeRO-2 applied a step with inf / NaN gradients (its check_grad_overflow was
    off by default): one such step left NaN weights, where DDP and FSDP skip it. The run now turns the check on, and
    refuses a config that turns it off or a DeepSpeed without it."""
    precision = pytest.importorskip("deepspeed.runtime.precision_config")  # the dev extra installs it
    from t2i_align.errors import UserError

    bf16 = [f"output_dir={tmp_path}", "train.mixed_precision=bf16"]
    ds = {"gradient_accumulation_steps": 1, "bf16": {"enabled": True}}
    with pytest.raises(PastTheChecks):
        _deepspeed_train(monkeypatch, ds, bf16)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    # and reduced and accumulated in fp32, as DDP does (ZeRO-2's default: bf16)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    off = {"gradient_accumulation_steps": 1, "bf16": {"enabled": True, "check_grad_overflow": False}}
    with pytest.raises(UserError, match="sets bf16.check_grad_overflow to false"):
        _deepspeed_train(monkeypatch, off, bf16)
    fp32 = {"gradient_accumulation_steps": 1, "bf16": {"enabled": False}}
    with pytest.raises(PastTheChecks):
        _deepspeed_train(monkeypatch, fp32, [f"output_dir={tmp_path}"])
    assert fp32["bf16"] == {"enabled": False}  # no bf16: nothing to skip, nothing set

    class OldBF16Config:
        model_fields = {"enabled": None, "immediate_grad_update": None}

    monkeypatch.setattr(precision, "DeepSpeedBF16Config", OldBF16Config)
    with pytest.raises(UserError, match="cannot skip bf16 steps with non-finite gradients.*pip install -U deepspeed"):
        _deepspeed_train(monkeypatch, {"gradient_accumulation_steps": 1, "bf16": {"enabled": True}},
                         [f"output_dir={tmp_path}", "train.mixed_precision=bf16"])


def test_deepspeed_auto_settings_are_filled_from_the_run(tmp_path, monkeypatch):
    """"auto" micro-batch size and clipping threshold come from train.batch_size and train.max_grad_norm (accelerate
    would stop for the first and fill in 1.0 for the second)."""
    ds = {"gradient_accumulation_steps": 1, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(PastTheChecks):
        _deepspeed_train(monkeypatch, ds, [f"output_dir={tmp_path}", "train.batch_size=3", "train.max_grad_norm=0"])
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0


@pytest.mark.parametrize("clip", ["1.0", "0.3", "0"])
def test_the_shipped_deepspeed_settings_pass_the_check(tmp_path, monkeypatch, clip):
    """deepspeed_zero2.yaml gets past the engine check (and then stops at the stand-in accelerator, once loading
    starts) whatever train.max_grad_norm the run config sets (the shipped configs use 1.0 and 0.3; 0 turns
    clipping off), and DeepSpeed is told to clip there. It pinned 1.0 once, which refused a run without clipping."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    launch_file = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    ds = DeepSpeedPlugin(**launch_file).deepspeed_config  # DeepSpeed's own keys, as the engine check reads them
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == "auto"
    with pytest.raises(PastTheChecks):
        _deepspeed_train(monkeypatch, ds, [f"output_dir={tmp_path}", f"train.max_grad_norm={clip}"])
    assert ds["gradient_clipping"] == float(clip)


@pytest.mark.parametrize("shared", [True, False])
def test_several_processes_need_an_output_dir_they_all_see(tmp_path, monkeypatch, shared):
    """The main process writes a probe into output_dir and every process must see it; on machines without a shared
    file system (here: process 1's view, gathered as "not seen") every process stops with a message, and the
    probe is removed either way. (Two real processes pass the check in every multi-process test.)"""
    import accelerate.utils

    from t2i_align.engines import check_shared_output
    from t2i_align.errors import UserError

    main = type("Main", (), {"num_processes": 2, "is_main_process": True, "wait_for_everyone": lambda self: None})()
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda flags: flags + [shared])  # process 1's view
    out = tmp_path / "run"
    if shared:
        check_shared_output(main, out)
    else:
        with pytest.raises(UserError, match=r"output_dir .*run is not shared: processes \[1\] do not see"):
            check_shared_output(main, out)
    assert out.is_dir() and not list(out.iterdir())


def test_a_settings_check_failing_on_another_machine_stops_this_one_too(tmp_path, monkeypatch):
    """The checks before loading (data files, the PPD table, reward weights) ran on each process alone: with a file
    missing on one machine's local disk its processes stopped, and the other machines' waited for them in their
    next collective until train.ddp_timeout (3 hours). Now every process hears of it (here process 1's failure,
    gathered) and stops at once."""
    import accelerate
    import accelerate.utils
    from accelerate.utils import DistributedType

    from t2i_align.config import load_config
    from t2i_align.errors import UserError
    from t2i_align.loop import train

    class TwoMachines:
        distributed_type = DistributedType.MULTI_GPU
        num_processes, is_main_process = 2, True

        def __init__(self, **kwargs):
            self.state = type("State", (), {})()

    gathered = []
    monkeypatch.setattr(accelerate, "Accelerator", TwoMachines)
    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda told: gathered.append(told) or told + [(True, "data.path /local/pairs does not exist")])
    monkeypatch.setattr("t2i_align.data.sources.check_data_files", lambda cfg: None)  # this machine has the files
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.wandb=off", f"model.pretrained={tmp_path}/none"])
    with pytest.raises(UserError, match=r"another process found a mistake in the settings \(a file missing on its "
                                        r"machine\?\): data.path /local/pairs does not exist"):
        train(cfg)
    assert gathered == [[None]]  # this process passed its own checks, and said so


def test_a_probe_that_shows_up_late_is_seen(tmp_path):
    """A fresh run's output_dir on NFS: the other machines' cached "does not exist" of the folder hid the main
    process's probe for up to a minute, and the check called a shared folder unshared at its first look."""
    import threading

    from t2i_align.engines import sees

    probe = tmp_path / "run" / ".shared-check-x"
    assert not sees(probe, wait_s=0)  # nothing there: one look, no wait
    later = threading.Timer(1.5, lambda: (probe.parent.mkdir(), probe.write_text("x")))
    later.start()
    try:
        assert sees(probe, wait_s=30)
    finally:
        later.join()


def test_an_output_dir_one_process_cannot_write_is_refused_at_start(tmp_path, monkeypatch):
    """With one process nothing was written there before the model was built: a read-only output_dir failed then,
    with a traceback from the tracker."""
    import tempfile

    from t2i_align.engines import check_shared_output
    from t2i_align.errors import UserError

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    one = type("P", (), {"num_processes": 1, "is_main_process": True})()
    with pytest.raises(UserError, match=r"output_dir .*run: cannot write in .* \(Read-only file system\)"):
        check_shared_output(one, tmp_path / "run")


def test_an_output_dir_the_main_process_cannot_write_stops_every_process(tmp_path, monkeypatch):
    """The main process failing to create output_dir (unwritable; a full disk alike) raises there, and the other
    processes, told its error with the probe's token, stop too instead of waiting for the main process. (A path
    under a file is refused before, by every process itself.)"""
    import pathlib

    import accelerate.utils

    from t2i_align.engines import check_shared_output
    from t2i_align.errors import UserError

    def process(main):
        return type("P", (), {"num_processes": 2, "is_main_process": main, "wait_for_everyone": lambda self: None})()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"output_dir .*file/run: .*file is a file, not a folder"):
        check_shared_output(process(False), tmp_path / "file" / "run")

    def unwritable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(pathlib.Path, "mkdir", unwritable)
    out, told = tmp_path / "locked" / "run", []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: told.extend(objects) or objects)
    with pytest.raises(PermissionError):
        check_shared_output(process(True), out)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: told)  # what the main one sent
    with pytest.raises(UserError, match=r"the main process could not write in output_dir .*locked/run: "
                                        r"Permission denied"):
        check_shared_output(process(False), out)



def test_work_of_the_main_process_that_fails_stops_every_process(monkeypatch):
    """engines.on_main (checkpoints, the export, setting runs aside, starting W&B): the main process's result on
    the main process; its failure raised there as itself and on the others as its text, so that none waits for it."""
    import accelerate.utils

    from t2i_align.engines import on_main
    from t2i_align.errors import UserError

    def process(main):
        return type("P", (), {"num_processes": 2, "is_main_process": main})()

    sent = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: sent.extend(objects) or objects)
    assert on_main(process(True), lambda: 7, "context") == 7 and sent == [None]

    def failing_disk():
        raise OSError(5, "Input/output error", "run/checkpoints/.step-4.tmp")
    with pytest.raises(OSError, match="Input/output error"):
        on_main(process(True), failing_disk, "context")
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: [sent[-1]])  # the main's
    with pytest.raises(RuntimeError, match=r"^the main process could not complete checkpoint x: OSError: "
                                           r"Input/output error: run/checkpoints/\.step-4\.tmp$") as info:
        on_main(process(False), lambda: 7, "the main process could not complete checkpoint x")
    assert not isinstance(info.value, UserError)  # not the user's mistake: a traceback names where it came from

    def full_disk():  # the machine's state, not a bug: one line on every process, as on the main one
        raise OSError(28, "No space left on device", "run/checkpoints/.step-4.tmp")
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: sent.extend(objects) or objects)
    with pytest.raises(OSError, match="No space left"):
        on_main(process(True), full_disk, "context")
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: [sent[-1]])
    with pytest.raises(UserError, match="could not complete checkpoint x: No space left on device: .*free space"):
        on_main(process(False), lambda: 7, "the main process could not complete checkpoint x")


def test_work_that_fails_on_any_process_stops_every_process(monkeypatch):
    """engines.on_every (accelerate's save_state: the weights written by the main process alone): a process whose
    work failed raises its own error; the others raise the first failure's text."""
    import accelerate.utils

    from t2i_align.engines import on_every

    process = type("P", (), {"num_processes": 2})()
    gathered = [None, (False, "OSError: No space left on device: run/checkpoints/.step-4.tmp/model.safetensors")]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: gathered)
    with pytest.raises(RuntimeError, match=r"^another process could not write checkpoint x: OSError: No space"):
        on_every(process, lambda: None, "another process could not write checkpoint x")

    def fails():
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):  # its own, with its traceback
        on_every(process, fails, "another process could not write checkpoint x")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: [None, None])
    on_every(process, lambda: None, "context")  # nobody failed: nothing raised


def test_a_final_folder_that_is_a_mount_point_is_refused_at_start(tmp_path, monkeypatch):
    """The export is renamed into place after the last step: a mount point there failed after all the training."""
    import os.path

    from t2i_align.engines import check_shared_output
    from t2i_align.errors import UserError

    one = type("One", (), {"num_processes": 1, "is_main_process": True})()
    (tmp_path / "run" / "final").mkdir(parents=True)
    check_shared_output(one, tmp_path / "run")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p).endswith("run/final") or real(p))
    with pytest.raises(UserError, match=r"run/final is a mount point, .* mount the volume at output_dir .*run "):
        check_shared_output(one, tmp_path / "run")


def test_launched_processes_that_did_not_join_one_run_are_refused(monkeypatch):
    """configs/accelerate/ddp.yaml on a machine without CUDA: accelerate launch started the processes, but each
    became a one-process run, and all but the first were told output_dir was in use by another run (their own)."""
    from types import SimpleNamespace

    import torch

    from t2i_align.engine_checks import check_processes_joined
    from t2i_align.errors import UserError

    alone = SimpleNamespace(num_processes=1, distributed_type="NO", device=torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(UserError, match="started 8 processes.*a run of its own.*ACCELERATE_USE_CPU=1 accelerate launch "
                                        "--multi_gpu --num_processes N"):
        check_processes_joined(alone)
    check_processes_joined(SimpleNamespace(num_processes=8, distributed_type="MULTI_CPU", device=torch.device("cpu")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes_joined(alone)  # torchrun --nproc_per_node 1
