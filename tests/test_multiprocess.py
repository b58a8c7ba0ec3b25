"""Two CPU processes (gloo) under `accelerate launch`: metrics and checkpoints written once, identical weights."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import save_tiny_pipeline
from helpers import write_rendered_pairs

SCRIPT = Path(__file__).with_name("multiprocess_train.py")
# accelerate's `--cpu --num_processes 2` only spawns several processes through mpirun; torchrun-style
# launching (`--multi_gpu`) with ACCELERATE_USE_CPU=1 gives two gloo processes on any machine.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def launch(*overrides: str) -> None:
    """multiprocess_train.py on two gloo processes with these config overrides; fails the test if it fails."""
    run_launch([*LAUNCH, *overrides], ENV)


def run_launch(command, env) -> None:
    """Fails the test unless every process finished multiprocess_train.py. gloo's threads can still abort a process
    at Python's teardown, after its last line ("terminate called without an active exception", exit -6:
    pytorch/pytorch#179291; rare, seen in the suite twice): that launch passes once every process wrote its marker."""
    with tempfile.TemporaryDirectory() as done:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "T2I_TEST_DONE": done})
        finished = sorted(p.name for p in Path(done).iterdir())
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr and finished and \
            len(finished) == int(finished[0].split("-of-")[1]):
        return
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("markers, passes", [(2, True), (1, False)])
def test_a_teardown_abort_passes_only_once_every_process_finished(markers, passes):
    code = ("import os, sys\nfrom pathlib import Path\n"
            f"for rank in range({markers}):\n    Path(os.environ['T2I_TEST_DONE'], f'{{rank}}-of-2').write_text('')\n"
            "sys.stderr.write('terminate called without an active exception\\n')\nos.abort()")
    if passes:
        run_launch([sys.executable, "-c", code], ENV)
    else:
        with pytest.raises(AssertionError, match="terminate called"):
            run_launch([sys.executable, "-c", code], ENV)


def test_two_process_lora_dpo(tmp_path):
    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=8)
    out = tmp_path / "run"
    args = [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", "data.resolution=16",
            "lora.enabled=true", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=1",
            "train.learning_rate=1e-2", "objective.beta=100", "tracking.wandb=off", "tracking.sample_steps=2",
            "tracking.validation_seeds=1", "train.lr_scheduler=linear", "train.lr_warmup_steps=1",
            "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}"]
    launch(*args, "train.max_steps=3", "train.ddp_timeout=1234")
    (cache,) = (tmp_path / "cache").iterdir()  # built by both processes, 4 of the 8 pairs each; nothing else left
    assert json.loads((cache / "complete.json").read_text())["pairs_per_process"] == [4, 4]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # written once, by the main process
    assert (out / "timeout0.txt").read_text() == (out / "timeout1.txt").read_text() == "1234"
    # A one-process run's schedule: warmup 1, linear decay to 0 at step 3 -> steps 1-3 train at 1e-2 · (0, 1, ½)
    # (the log showed the rate after each step: the next step's). accelerate steps a prepared scheduler once per
    # process, so it must be built in those units.
    assert [r["lr"] for r in records] == pytest.approx([0.0, 1e-2, 5e-3], abs=1e-12)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    rank0, rank1 = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    assert rank0 == rank1
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    # Resume of a LoRA run under DDP (the check of the checkpoint's LoRA weights must see the UNet's names, not
    # DDP's `module.`): test_two_process_resume_equals_an_uninterrupted_run[ppd]


def test_two_process_raft_gathers_the_pool_and_selects_globally(tmp_path):
    out = tmp_path / "raft"
    launch("model.pretrained=toy", "lora.enabled=true", "objective.name=sft", "raft.enabled=true",
           "raft.prompts=toy:train", "raft.prompts_per_round=4", "raft.k=2", "raft.round_steps=1",
           "raft.sample_steps=2", "raft.top_fraction=0.5", f"output_dir={out}", "train.batch_size=2",
           "train.max_steps=2", "train.log_every=1", "tracking.wandb=off", "tracking.sample_steps=2",
           "tracking.validation_seeds=1")
    rounds = [json.loads(line) for line in (out / "raft_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]  # written once, by the main process
    for r in rounds:  # each process generated 2 prompts; the pool and the choice cover all 4
        assert len(r["prompts"]) == 4 and len(r["selected"]) == 2
        best = [max(row) for row in r["scores"]]
        chosen = {p for p, _ in r["selected"]}
        assert all(r["scores"][p][k] == best[p] for p, k in r["selected"])  # best of K per prompt
        assert min(best[p] for p in chosen) >= max(best[p] for p in range(4) if p not in chosen)  # global top
    assert (out / "rank0.txt").read_text() == (out / "rank1.txt").read_text()


RESUMED = {
    # SePPO: its snapshot pool and draw stream must be restored on every process.
    "seppo": ["lora.enabled=true", "objective.name=seppo", "seppo.snapshot_every=1", "seppo.pool_size=4",
              "seppo.sample_steps=2"],
    # PPD: user 99's images do not decode, so one process meets a batch of only unusable rows and reads one raw
    # batch more than the other; each must resume at its own position in the data. With LoRA beside the branch.
    "ppd": ["ppd.enabled=true", "lora.enabled=true"],
    # RAFT: stopped inside round 1 (steps 3-4); every process must train on the checkpoint's pool.
    "raft": ["model.pretrained=toy", "lora.enabled=true", "objective.name=sft", "raft.enabled=true",
             "raft.prompts=toy:train", "raft.prompts_per_round=4", "raft.k=2", "raft.round_steps=2",
             "raft.sample_steps=2", "raft.top_fraction=0.5", "train.learning_rate=1e-3"],
}


# under -m slow: RAFT 42 s, SePPO 28 s (its draw depends on (seed, step) alone: test_seppo.py); PPD, with LoRA,
# stays: a LoRA checkpoint resumed under DDP, and each process at its own raw position
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ("raft", "seppo") else m
                                    for m in sorted(RESUMED)])
def test_two_process_resume_equals_an_uninterrupted_run(tmp_path, method):
    """Under DDP a run resumed from the step-3 checkpoint (of the uninterrupted run, as after a crash there; in
    another output_dir, which saves a launch) takes the same steps as one never stopped: same losses, same weights
    on both processes (and for SePPO the same reference draws, on every process). Logged every 2 steps: the
    step-3 checkpoint holds each process's unlogged step-3 metrics, which the resumed step-4 line averages in."""
    from test_ppd_loop import write_table, write_user_pairs

    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    data = write_user_pairs(tmp_path / "pairs.parquet", users=[1, 2, 3, 99], corrupt_users=[99])
    table = write_table(tmp_path / "users.safetensors", [1, 2, 3, 99])
    base = [f"model.pretrained={model}", f"data.path={data}", "data.resolution=16",
            "objective.beta=100", "train.batch_size=2", "train.log_every=2", "train.learning_rate=1e-2",
            "train.checkpoint_every=1", "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1",
            *RESUMED[method], *([f"ppd.table={table}"] if method == "ppd" else [])]
    launch(*base, f"output_dir={tmp_path / 'full'}", "train.max_steps=5", "train.keep_checkpoints=3")
    launch(*base, f"output_dir={tmp_path / 'part'}", "train.max_steps=5",
           f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-3'}")

    def logged(run, key="loss"):
        return [json.loads(line)[key] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    # the new output_dir's metrics.jsonl continues the checkpoint's (the step-2 line copied, 4 and 5 trained)
    assert logged("part") == pytest.approx(logged("full"), abs=1e-6) and logged("part", "step") == [2, 4, 5]
    for run, rank in (("full", 1), ("part", 0), ("part", 1)):
        assert (tmp_path / run / f"rank{rank}.txt").read_text() == (tmp_path / "full" / "rank0.txt").read_text()
    if method == "ppd":  # the case the per-process counts exist for: the processes had read different amounts
        from t2i_align.checkpoints import read_marker

        assert len(set(read_marker(tmp_path / "full" / "checkpoints" / "step-5")["raw_batches"])) == 2
        # the unusable rows, summed over both processes, go on from the checkpoint's total
        skipped = logged("full", "data_rows_skipped")
        assert logged("part", "data_rows_skipped") == skipped and skipped[-1] > skipped[0] > 0
    if method == "seppo":  # every process drew the same reference at each step, the initial model first; the
        # resumed processes drew steps 4-5 only, as the uninterrupted run did
        full_draws = json.loads((tmp_path / "full" / "draws0.json").read_text())
        assert json.loads((tmp_path / "full" / "draws1.json").read_text()) == full_draws
        assert len(full_draws) == 5 and full_draws[0] == 0
        for rank in (0, 1):
            assert json.loads((tmp_path / "part" / f"draws{rank}.json").read_text()) == full_draws[3:]


def _until_one_fails(machines, timeout=600):
    """Wait for every process; once one has failed, kill the others (they would wait for their peer until
    the rendezvous times out)."""
    import time

    deadline = time.monotonic() + timeout
    while any(m.poll() is None for m in machines) and time.monotonic() < deadline:
        if any(m.poll() not in (None, 0) for m in machines):
            break
        time.sleep(0.5)
    for machine in machines:
        machine.kill()
        machine.wait()


def test_two_machine_launch_takes_the_one_machine_steps(tmp_path, ddp_lora_run):
    """configs/accelerate/ddp_multinode.yaml as on two machines of one process each (both on this host, over
    127.0.0.1, machine ranks 0 and 1 launched side by side): the same run as two processes on one machine. Only the
    global main process writes (each machine has a local main process; on a shared file system both would)."""
    import socket

    args, one = ddp_lora_run  # the same run launched as two processes on one machine
    args = [*args, "train.max_steps=3"]
    config = SCRIPT.parents[1] / "configs" / "accelerate" / "ddp_multinode.yaml"
    for attempt in range(3):  # the free port found may be taken before the rendezvous binds it: then a new one
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        logs = [tmp_path / f"machine{rank}.err" for rank in (0, 1)]  # files: a full pipe would block a process
        handles = [log.open("w") for log in logs]
        machines = [subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *args,
             f"output_dir={tmp_path / 'two'}"],
            stdout=subprocess.DEVNULL, stderr=handles[rank], env=ENV) for rank in (0, 1)]
        _until_one_fails(machines)
        for handle in handles:
            handle.close()
        errs = [log.read_text() for log in logs]
        if not any("address already in use" in err.lower() for err in errs):
            break
    for machine, err in zip(machines, errs):
        assert machine.returncode == 0, err[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    two = tmp_path / "two"
    assert losses(two) == losses(one) and len(losses(one)) == 3
    assert (two / "rank0.txt").read_text() == (one / "rank0.txt").read_text()
    assert (two / "rank1.txt").read_text() == (one / "rank0.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-2", "step-3"]


@pytest.mark.parametrize("fails, told_rank, message", [
    # 20 s; the main process's side: the RAFT case's mirror (a full disk told in one line since session 37)
    pytest.param("metrics", 1, "the main process could not log metrics: No space left on device: metrics.jsonl: "
                 "free space or write elsewhere", marks=pytest.mark.slow),
    ("raft", 0, "another process could not generate or score its RAFT samples: RuntimeError: CUDA out of memory")])
def test_a_failure_on_one_process_is_told_to_the_other(tmp_path, fails, told_rank, message):
    """engines.on_main / on_every across two real processes: the main process cannot write a metrics line (a full
    disk, faked on rank 0 alone), or process 1 fails generating its RAFT samples; the other process stops with
    that message rather than waiting in the next collective."""
    proc = subprocess.run([*LAUNCH, "model.pretrained=toy", "lora.enabled=true", "objective.name=sft",
                           "raft.enabled=true", "raft.prompts=toy:train", "raft.prompts_per_round=2", "raft.k=2",
                           "raft.round_steps=2", "raft.sample_steps=2", "train.batch_size=1", "train.max_steps=2",
                           "train.log_every=1", "tracking.wandb=off", "tracking.validation_prompts=[]",
                           f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=600, env={**ENV, "T2I_TEST_FAILS": fails})
    told = [line for line in proc.stderr.splitlines() if line.startswith(f"[rank{told_rank}]") and "Error" in line]
    assert proc.returncode != 0 and told, proc.stderr[-3000:]
    assert message in told[-1], told
