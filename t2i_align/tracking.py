"""Run tracking: metrics.jsonl (always), W&B (online / offline / off, never prompting) and local HTML galleries.

Only the main process writes. W&B "auto" follows WANDB_MODE when it is set, else means online when WANDB_API_KEY
is set and offline otherwise, so a run without credentials never stops at a login prompt; when "auto" chose online
for the key and the server cannot be reached, it logs offline, saying so. Offline runs can be uploaded later with
`wandb sync`.
A run resumed from its folder's newest checkpoint continues its W&B run (the id kept in `WANDB_ID_FILE`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import UserError, one_line
from .gallery import write_gallery

WANDB_MODES = ("auto", "online", "offline", "off")
PANEL_IMAGES = 100
"""Images per W&B image panel (W&B keeps the first 108 of a list)."""
WANDB_ID_FILE = "wandb_run_id"
"""output_dir/WANDB_ID_FILE: the W&B run's id, written once the run owns output_dir."""


def resolve_wandb_mode(mode: str) -> str:
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown tracking.wandb={mode!r}; use one of {', '.join(WANDB_MODES)}")
    if mode == "auto":  # W&B's own WANDB_MODE first (an explicit mode is passed to wandb.init, which then wins)
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        env = {"dryrun": "offline", "disabled": "off"}.get(env, env)
        if env in ("online", "offline", "off"):
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def _wandb_failure(err: Exception) -> str:
    """What to do when W&B did not start: a refused key (an AuthenticationError, a CommError too) or no server."""
    import wandb

    if isinstance(err, wandb.errors.AuthenticationError):
        return (f"W&B refused the API key ({one_line(err)[:200]}): check WANDB_API_KEY or run `wandb login`, or log "
                "offline (WANDB_MODE=offline)")
    if not isinstance(err, wandb.errors.CommError):  # no key configured, a wandb service that did not start...
        return (f"W&B did not start ({one_line(err)[:200]}): fix that, or log offline (WANDB_MODE=offline, "
                "tracking.wandb=offline or --wandb offline) or not at all (tracking.wandb=off or --wandb off)")
    return (f"W&B could not reach its server ({one_line(err)[:200]}): log offline (WANDB_MODE=offline, "
            "tracking.wandb=offline or --wandb offline) and upload later with `wandb sync`")


def _chose_online(asked: str, mode: str) -> bool:
    """"auto" went online only because an API key is set (not WANDB_MODE=online): offline is as good a choice."""
    return asked == "auto" and mode == "online" and not os.environ.get("WANDB_MODE", "").strip()


def _unreachable(err: Exception) -> bool:
    import wandb

    return isinstance(err, wandb.errors.CommError) and not isinstance(err, wandb.errors.AuthenticationError)


def _start_wandb(start: Callable, asked: str, mode: str):
    """`start(mode=mode)`; a refusal is one UserError line, but an unreachable server when "auto" went online
    for an API key logs offline instead, saying so."""
    import wandb

    try:
        return start(mode=mode)
    except wandb.errors.Error as err:  # no network (W&B gives up after about 90 s), a refused key, no key
        if not (_chose_online(asked, mode) and _unreachable(err)):
            raise UserError(_wandb_failure(err)) from err
        print(f"warning: W&B could not reach its server ({one_line(err)[:200]}); tracking.wandb=auto logs offline "
              "instead (upload later with `wandb sync`)", file=sys.stderr)
    try:
        return start(mode="offline")
    except wandb.errors.Error as err:
        raise UserError(_wandb_failure(err)) from err


def _check_api_key() -> None:
    """W&B online without an API key asks for one at a prompt on a terminal, with no time limit (the other
    processes waiting in a collective until train.ddp_timeout): refused in one line instead. Without a terminal
    wandb.init refuses itself."""
    if getattr(sys.stdin, "isatty", lambda: False)() and not _has_api_key():
        raise UserError("W&B online needs an API key and none is configured: set WANDB_API_KEY or run `wandb "
                        "login`, or log offline (tracking.wandb=offline or --wandb offline) or not at all "
                        "(tracking.wandb=off or --wandb off)")


def _has_api_key() -> bool:
    """Whether W&B has a key: WANDB_API_KEY (or an identity token file), else the netrc entry `wandb login` writes
    for its server. Read here, not by wandb.login, which says False under an offline mode (WANDB_MODE, `wandb
    offline`) that an explicit online overrides. An unreadable netrc counts as a key: wandb.init decides."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return True
    return bool(entry and entry[2])


def continued_run_id(output_dir: str | os.PathLike, resume: Optional[Path]) -> Optional[str]:
    """The W&B run to continue: the one output_dir records, when resuming from its newest checkpoint. Not after a
    fresh start, a resume from another folder (a fork of that run), from an earlier checkpoint or from the newest
    one when final/ was exported later (the W&B run holds the later steps of the timeline this run abandons)."""
    from .checkpoints import checkpoint_step, list_checkpoints
    from .run_dir import exported_past

    found = list_checkpoints(output_dir)
    record = Path(output_dir) / WANDB_ID_FILE
    if resume is None or not found or found[-1][1].resolve() != Path(resume).resolve() or not record.is_file() \
            or exported_past(Path(output_dir), checkpoint_step(resume)):
        return None
    return record.read_text().strip() or None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf; keep them visible as strings
    return value


class Tracker:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors metrics and galleries to W&B."""

    def __init__(self, output_dir: str | os.PathLike, wandb_mode: str = "auto", project: str = "t2i-align",
                 run_name: Optional[str] = None, config: Optional[Dict] = None, enabled: bool = True,
                 run_id: Optional[str] = None):
        """`run_id`: an earlier W&B run to continue (resume="allow": W&B keeps the steps it already has, which a
        resumed run logs again with the same values, and appends the rest)."""
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._wandb, self._wandb_failed, self.run_id = None, False, run_id
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        mode = resolve_wandb_mode(wandb_mode)
        if mode == "online":
            _check_api_key()
        if mode != "off":
            import wandb

            again = {"id": run_id, "resume": "allow"} if run_id else {}
            self._wandb = _start_wandb(partial(wandb.init, project=project, name=run_name, config=config or {},
                                               dir=str(self.output_dir), reinit="finish_previous", **again),
                                       wandb_mode, mode)

    @property
    def wandb_run_dir(self) -> Optional[Path]:
        return Path(self._wandb.dir).parent if self._wandb is not None else None

    def record_run_id(self) -> None:
        """Write the W&B run's id into output_dir (after the run claimed it), for a resume to continue it. Without
        W&B, an id this run does not continue goes: the abandoned timeline's, a later resume of this one with W&B
        on would have continued (W&B then dropped this timeline's steps up to that run's last one)."""
        if self._wandb is not None:
            from .files import write_text_atomic

            write_text_atomic(self.output_dir / WANDB_ID_FILE, self._wandb.id + "\n")
        elif self.enabled and self.run_id is None:
            (self.output_dir / WANDB_ID_FILE).unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop logged steps after the checkpoint, so metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        from .files import keep_jsonl

        torn = keep_jsonl(self.metrics_path, lambda record: record.get("step", 0) <= step)
        if torn:
            print(f"{self.metrics_path}: dropped {torn} line(s) that were not JSON (written as the run stopped?)",
                  file=sys.stderr)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # tensors to numbers
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # W&B charts NaN and inf as numbers: not the file's strings
        self._to_wandb(lambda: self._wandb.log(values, step=step))

    def log_gallery(self, rows: List[Dict], step: int, columns: Optional[Sequence[str]] = None,
                    name: str = "gallery", title: Optional[str] = None) -> Optional[Path]:
        """Write `<output_dir>/<name>/index.html` (replacing the previous one whole) and log images + a table.
        `title`: the page's (default: "<name> at step <step>", a training run's)."""
        if not self.enabled:
            return None
        path = write_gallery(self.output_dir / name, rows, title=title or f"{name} at step {step}", columns=columns)
        self._to_wandb(lambda: self._log_wandb_gallery(rows, step, columns, name))
        return path

    def _to_wandb(self, send: Callable[[], object]) -> None:
        """`send()` to W&B, if it runs; when its service fails mid-run (a lost connection, its process gone) the run
        goes on without it, warned once: metrics.jsonl and the local galleries keep everything (it stopped
        training, hours in)."""
        if self._wandb is None or self._wandb_failed:
            return
        import wandb

        try:
            send()
        except (wandb.errors.Error, OSError) as err:  # ConnectionError, BrokenPipeError are OSErrors
            self._wandb_failed = True
            warnings.warn(f"W&B stopped taking this run's logs ({one_line(err)[:200]}): the run goes on without it; "
                          f"{self.metrics_path} and the local galleries keep everything")

    def _log_wandb_gallery(self, rows, step, columns, name) -> None:
        import wandb

        headers = list(columns) if columns else [f"image {i}" for i in range(len(rows[0]["images"]))]
        table = wandb.Table(columns=["prompt"] + headers)
        images = []
        for row in rows:
            captions = row.get("captions") or [""] * len(row["images"])
            cells = [wandb.Image(im, caption=f"{row['prompt']} | {c}") for im, c in zip(row["images"], captions)]
            table.add_data(row["prompt"], *cells)
            images += cells
        # W&B shows the first 108 images of a logged list (wandb.Image.MAX_ITEMS): longer galleries in parts
        parts = {f"{name}/images" + (f"_{i // PANEL_IMAGES + 1}" if i else ""): images[i:i + PANEL_IMAGES]
                 for i in range(0, len(images), PANEL_IMAGES)}
        self._wandb.log({**parts, f"{name}/table": table}, step=step)

    def finish(self) -> None:
        if self._wandb is not None:
            self._to_wandb(self._wandb.finish)
            self._wandb = None
