"""Reference providers: who plays the reference denoiser over training.

- `BaseReference` (Diffusion-DPO): the base model throughout. Adapters (LoRA, PPD's user branch): the policy UNet
  with every adapter disabled, under no_grad; full fine-tune: a frozen copy in the weight dtype (optionally
  offloaded to the CPU).
- `SnapshotPool` (SePPO's random checkpoint replay, Zhang et al. 2024, arXiv 2410.05255, Alg. 1): past policy
  snapshots, the initial model included; at every optimizer step one is drawn (`random` ~ U(0, k-1), `initial`,
  `latest`) with a generator seeded by (seed, step), so every process and every resume draws the same one.
  LoRA snapshots are the adapter tensors, evaluated with `torch.func.functional_call` so the live policy's
  parameters (and the autograd graph built from them) are never touched; full fine-tune snapshots are
  safetensors files under `output_dir/reference_pool/`, loaded into the one frozen copy when drawn.

The loop calls `begin_step(step)` before a step's micro-batches, `after_step(done)` after the optimizer step,
and saves `state()` / `save(folder)` with each checkpoint; the loop never knows which provider it holds.
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from .batches import make_denoiser, unet_kwargs
from .errors import describe, raise_told
from .files import fsync_path, save_safetensors_atomic
from .adapters import BaseSwitch, visiting
from .objectives.base import Denoiser
from .snapshots import POOL_DIR, link_snapshots, read_lora_pool, snapshot_files

logger = logging.getLogger(__name__)
DRAWS = ("random", "initial", "latest")
POOL_STATE_FILE = "reference_pool.json"
_TENSORS_FILE = "reference_pool.safetensors"


class BaseReference:
    """The base model as reference (fixed over training); also the interface every provider keeps."""

    def __init__(self, unet: torch.nn.Module, components, adapters: bool, frozen: Optional[torch.nn.Module]):
        """adapters: only adapters train (LoRA and/or PPD's user branch), so the base is the same UNet with every
        adapter off; else a full fine-tune, whose base is `frozen`."""
        self.unet, self.components, self.adapters, self.frozen = unet, components, adapters, frozen
        self._switch: Optional[BaseSwitch] = None
        if not adapters and (frozen is None or frozen is unet):
            raise ValueError("full fine-tuning needs a frozen reference copy that is not the policy UNet")

    def denoiser(self) -> Denoiser:
        if self.adapters:
            return _adapters_off(self.switch(), self.components)
        return _frozen_denoiser(self.frozen, self.components)

    def switch(self) -> BaseSwitch:
        """The UNet's base switch, made at the first reference call (the UNet's adapters are all in place by then)."""
        if self._switch is None:
            self._switch = BaseSwitch(self.unet)
        return self._switch

    @contextmanager
    def base_unet(self) -> Iterator[torch.nn.Module]:
        """The base model's UNet for sampling (validation galleries): adapters off, or the frozen copy."""
        if self.adapters:
            with self.switch().off():
                yield self.unet
        else:
            yield self.frozen

    def begin_step(self, step: int) -> None:
        """Called before the micro-batches of optimizer step `step` (0-based)."""

    def after_step(self, done: int, applied: bool = True) -> None:
        """Called after `done` optimizer steps have been taken; `applied`: the last one changed the weights (a
        non-finite gradient skips the update)."""

    def after_checkpoint(self) -> None:
        """Called on every process after a checkpoint is complete (and older ones pruned)."""

    def metrics(self) -> Dict[str, float]:
        return {}

    def state(self) -> Dict:
        return {}

    def save(self, folder: Path) -> None:
        """Write what a resumed run needs into the checkpoint folder (main process only)."""

    def load(self, folder: Path) -> None:
        """Restore from a checkpoint folder written by `save` (every process)."""


def _adapters_off(switch: BaseSwitch, components) -> Denoiser:
    inner = make_denoiser(switch.unet, components)

    def reference(noisy, t, embeds, time_ids=None):
        with switch.off():  # dropout off too, as the official frozen copy: dropout > 0 gives a noisy reference
            return inner(noisy, t, embeds, time_ids)

    return reference


def _frozen_denoiser(frozen, components) -> Denoiser:
    """A frozen copy in its own dtype, moved to the latents' device for the call if it was offloaded."""
    inner = make_denoiser(frozen, components)
    dtype = next(frozen.parameters()).dtype

    @torch.no_grad()
    def reference(noisy, t, embeds, time_ids=None):
        with visiting(frozen, noisy.device):  # back on the CPU afterwards, also after an out-of-memory error
            # time ids stay float32: bf16 rounds sizes like 1023 to 1024 (the policy sees them exact)
            return inner(noisy.to(dtype), t, embeds.to(noisy.device, dtype),
                         None if time_ids is None else time_ids.to(noisy.device, torch.float32)).float()

    return reference


def draw_index(draw: str, pool_len: int, seed: int, step: int) -> int:
    """Which snapshot plays the reference at `step`: identical on every process and on resume."""
    if draw == "initial":
        return 0
    if draw == "latest":
        return pool_len - 1
    if draw == "random":  # SePPO's ref ~ U(0, k-1)
        return int(np.random.default_rng([seed % 2**63, step]).integers(pool_len))
    raise ValueError(f"unknown reference draw {draw!r}; use one of {DRAWS}")


class SnapshotPool(BaseReference):
    """SePPO's random checkpoint replay: a pool of at most `pool_size` snapshots taken every `snapshot_every`
    optimizer steps. Our choice where the paper is silent: when full, the oldest snapshot after the initial model
    leaves (the initial model always stays, as SePPO's U(0, k-1) includes it). The draws that use one snapshot
    keep no other: `initial` the initial model alone, `latest` it and the newest (each unused full snapshot was a
    UNet-sized write, and under FSDP a gather)."""

    def __init__(self, unet, components, adapters: bool, frozen, *, snapshot_every: int, pool_size: int, draw: str,
                 seed: int, output_dir: Path, is_main: bool = True, share: Callable[[Any], Any] = lambda value: value,
                 weights: Optional[Callable[[], Dict[str, torch.Tensor]]] = None, in_memory: bool = False,
                 resume_from: Optional[Path] = None):
        """`share(value)`: the main process's `value` on every process (a collective, so also a barrier).
        `weights`: the policy's whole state dict, called on every process when a full fine-tune snapshot is
        taken (under FSDP a collective that gathers the shards onto the main process: `engines.full_weights`).
        `in_memory`: keep full fine-tune snapshots in CPU RAM once read (seppo.snapshots_in_memory).
        `resume_from`: the checkpoint named by train.resume, whose snapshots stay although it may lie outside
        output_dir/checkpoints (copied here by run_dir.prepare_run_dir)."""
        super().__init__(unet, components, adapters, frozen)
        self.weights, self.in_memory = weights or unet.state_dict, in_memory
        self.ram: Dict[int, Dict[str, torch.Tensor]] = {}  # full fine-tune: step -> weights read (in_memory)
        if draw not in DRAWS:
            raise ValueError(f"unknown reference draw {draw!r}; use one of {DRAWS}")
        self.snapshot_every, self.pool_size, self.draw, self.seed = snapshot_every, pool_size, draw, seed
        self.kept = {"initial": 1, "latest": min(pool_size, 2)}.get(draw, pool_size)  # snapshots any draw can use
        self.resume_from = resume_from
        self.output_dir, self.is_main, self.share = Path(output_dir), is_main, share
        self.pool_dir = self.output_dir / POOL_DIR
        self.steps: List[int] = []          # the step each snapshot was taken at, oldest first
        self.tensors: Dict[int, Dict[str, torch.Tensor]] = {}   # LoRA: step -> adapter tensors
        self.current: Optional[int] = None  # the step of the snapshot drawn for this optimizer step
        self.loaded: Optional[int] = None   # full fine-tune: the snapshot now in the frozen copy
        self.step = 0                       # optimizer steps the policy has taken (set by begin_step)
        self.last_applied: Optional[int] = 0  # the last of them that changed its weights (None: unknown)
        self._take(0)

    # -- pool upkeep ---------------------------------------------------------------------------------------
    def _adapter_names(self) -> List[str]:
        return [name for name, p in self.unet.named_parameters() if p.requires_grad]

    def _trim(self) -> None:
        """The oldest snapshots after the initial model leave until `kept` remain."""
        while len(self.steps) > self.kept:
            gone = self.steps.pop(1)
            self.tensors.pop(gone, None)
            self.ram.pop(gone, None)

    def _take(self, step: int) -> None:
        if step > 0 and self.kept == 1:  # the pool is the initial model alone: a snapshot would leave at once
            return
        if self.adapters:
            params = dict(self.unet.named_parameters())
            self.tensors[step] = {n: params[n].detach().clone() for n in self._adapter_names()}
        self.steps.append(step)
        self._trim()
        if not self.adapters:
            self._write_full(step)  # and the files of snapshots that left the pool deleted

    def _collect(self) -> None:
        """Main process: delete full-model snapshot files that neither the pool nor any saved checkpoint lists. A
        checkpoint set aside by run_dir.set_aside_newer (abandoned-...-from-step-N/) keeps its snapshots up to
        step N here; its later ones went aside with it, and the files of those names here are this run's."""
        def listed(state: Path) -> List[int]:
            return [int(s) for s in json.loads(state.read_text())["steps"]]
        keep = set(self.steps)
        checkpoints = self.output_dir / "checkpoints"
        # [!.]: a .step-N.tmp a stopped save left is no checkpoint
        for state in checkpoints.glob("[!.]*/" + POOL_STATE_FILE):
            keep.update(listed(state))
        for state in checkpoints.glob("abandoned-*/[!.]*/" + POOL_STATE_FILE):
            until = int(re.search(r"-from-step-(\d+)", state.parent.parent.name).group(1))  # not a -2 suffix
            keep.update(s for s in listed(state) if s <= until)
        resumed = self.resume_from / POOL_STATE_FILE if self.resume_from is not None else None
        if resumed is not None and resumed.is_file():
            keep.update(listed(resumed))
        for step, path in snapshot_files(self.output_dir).items():
            if step not in keep:
                path.unlink()
        for stray in self.pool_dir.glob(".step-*.safetensors.*"):  # a write killed before its rename (this process
            stray.unlink(missing_ok=True)  # alone writes them, and not now)

    def _file(self, step: int) -> Path:
        return self.pool_dir / f"step-{step}.safetensors"

    def _write_full(self, step: int) -> None:
        """Full fine-tune snapshot to disk in the frozen copy's dtype (kept while a checkpoint lists it), and the
        files no longer needed deleted. Every process waits for the file (any may draw it at the next step) and
        stops if the main process failed (a full disk), rather than wait for it in the next collective until the
        run's timeout."""
        weights = self.weights()  # every process: under FSDP the gather is collective
        failed = None
        if self.is_main:
            try:
                # a later step's file may be left by a run that crashed before its checkpoint: written anew (step 0,
                # the initial model, is the same in every run)
                if step > 0 or not self._file(step).is_file():
                    self._save_snapshot(step, weights)
            except Exception as err:  # told to the others below, then raised here with its traceback
                failed = err
        told = self.share(describe(failed))
        if failed is not None:
            raise failed
        raise_told(told, f"the main process could not write SePPO's reference snapshot {self._file(step)}")
        self.after_checkpoint()  # the files no longer needed

    def _save_snapshot(self, step: int, weights: Dict[str, torch.Tensor]) -> None:
        """Complete or absent, fsynced with its folder entry: the checkpoint that lists it is marked complete right
        after, and older ones pruned, so after a host crash it must not be an empty file (a failed write leaves no
        UNet-sized temp file either)."""
        dtype = next(self.frozen.parameters()).dtype
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
        save_safetensors_atomic(self._file(step), state, metadata={})
        fsync_path(self.pool_dir)

    def begin_step(self, step: int) -> None:
        self.step = step
        self.current = self.steps[draw_index(self.draw, len(self.steps), self.seed, step)]

    def reference_is_policy(self) -> bool:
        """Whether the drawn snapshot holds the weights the policy has: taken after the policy's last applied
        update (a step skipped for a non-finite gradient changes nothing), so any error difference between them is
        rounding, not preference. `last_applied` unknown (a checkpoint from before session 35): this very step."""
        if self.current is None:
            return False
        return self.current == self.step if self.last_applied is None else self.current >= self.last_applied

    def after_step(self, done: int, applied: bool = True) -> None:
        if applied:
            self.last_applied = done
        if self.snapshot_every and done % self.snapshot_every == 0 and done not in self.steps:
            self._take(done)

    def after_checkpoint(self) -> None:
        """Files only the checkpoints just pruned listed are deleted now, not at the next snapshot (after the last
        one they stayed for good: GBs each); after each snapshot too. Best effort (main process): a file left is
        removed by a later collection, and a damaged record never stops the run."""
        if self.is_main and not self.adapters:
            try:
                self._collect()
            except Exception as err:  # e.g. a damaged checkpoint's pool record: rank 0 alone must not stop here
                logger.warning("warning: could not delete unused SePPO snapshots in %s: %s", self.pool_dir, err)

    # -- the reference denoiser ---------------------------------------------------------------------------
    def denoiser(self) -> Denoiser:
        if self.adapters:
            return self._adapter_snapshot()
        return self._full_snapshot()

    def _adapter_snapshot(self) -> Denoiser:
        unet, components, switch = self.unet, self.components, self.switch()

        @torch.no_grad()
        def reference(noisy, t, embeds, time_ids=None):
            kwargs = unet_kwargs(components, embeds, time_ids)
            with switch.deterministic():  # no LoRA dropout in the reference
                # the snapshot's adapter tensors stand in for the live ones for this call only
                return torch.func.functional_call(unet, self.tensors[self._drawn()], (noisy, t), kwargs,
                                                  strict=False).sample

        return reference

    def _full_snapshot(self) -> Denoiser:
        inner = _frozen_denoiser(self.frozen, self.components)

        def reference(noisy, t, embeds, time_ids=None):
            self._load_full(self._drawn())
            return inner(noisy, t, embeds, time_ids)

        return reference

    def _load_full(self, step: int) -> None:
        if self.loaded != step:
            self.frozen.load_state_dict(self._read_full(step))
            self.loaded = step

    def _read_full(self, step: int) -> Dict[str, torch.Tensor]:
        """Snapshot `step`'s weights: from RAM if read before and kept (`in_memory`), else from its file."""
        from safetensors.torch import load_file

        if step not in self.ram:
            state = load_file(str(self._file(step)))
            if not self.in_memory:
                return state
            self.ram[step] = state
        return self.ram[step]

    def _drawn(self) -> int:
        if self.current is None:
            raise RuntimeError("SnapshotPool.begin_step(step) must be called before the reference is used")
        return self.current

    @contextmanager
    def base_unet(self) -> Iterator[torch.nn.Module]:
        if self.adapters:
            with self.switch().off():
                yield self.unet
            return
        self._load_full(0)  # the initial weights, whichever snapshot the frozen copy held
        yield self.frozen

    # -- logging and checkpoints ----------------------------------------------------------------------------
    def metrics(self) -> Dict[str, float]:
        if self.current is None:
            return {}
        return {"reference_step": float(self.current), "reference_index": float(self.steps.index(self.current)),
                "reference_pool_size": float(len(self.steps))}

    def state(self) -> Dict:
        return {"steps": list(self.steps), "last_applied": self.last_applied}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / POOL_STATE_FILE).write_text(json.dumps(self.state()))
        if self.adapters:
            flat = {f"{step}/{name}": t.detach().to("cpu").contiguous()
                    for step, tensors in self.tensors.items() for name, t in tensors.items()}
            save_file(flat, str(folder / _TENSORS_FILE))
        else:
            link_snapshots([self._file(step) for step in self.steps], folder / POOL_DIR)

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        path = folder / POOL_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {POOL_STATE_FILE}: it was not written by a run with a "
                                    "snapshot reference pool; resume with the run's own config")
        state = json.loads(path.read_text())
        steps = [int(s) for s in state["steps"]]
        if self.adapters:
            self.tensors = read_lora_pool(folder / _TENSORS_FILE, steps, self.unet)
        else:
            missing = [str(self._file(s)) for s in steps if not self._file(s).is_file()]
            if missing:
                raise FileNotFoundError(f"reference snapshots of checkpoint {folder} are missing: {missing[:3]}; "
                                        f"copy them from its run's {POOL_DIR}/ into {self.pool_dir}")
        self.steps, self.current, self.loaded, self.ram = steps, None, None, {}
        self.last_applied = state.get("last_applied")
        self._trim()  # a resume with a smaller seppo.pool_size, or a draw that uses fewer (initial, latest)
