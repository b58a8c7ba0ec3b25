"""User errors: a mistake the user can fix ends as ONE line `error: ...` and exit code 2; tracebacks are for our bugs.

Raise `UserError` (or a subclass: `ConfigError` for settings, `reward_models.cli.UsageError` for arguments) with a
message that says what to do. Every command-line entry point runs its body through `run_cli`, which prints such
errors (and a missing file or folder, `FileNotFoundError`) as one line and returns 2. `T2I_ALIGN_DEBUG=1` re-raises
them, traceback included, for developers.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, Type

EXIT_USER_ERROR = 2
DEBUG_ENV = "T2I_ALIGN_DEBUG"


class UserError(Exception):
    """A mistake the user can fix: a missing file or folder, a wrong setting, an incompatible combination.

    The message is shown alone, as `error: <message>`, so it must name the setting or file and say what to do.
    """


_DEFINED_ELSEWHERE: Tuple[Tuple[str, str], ...] = (("wandb.errors.errors", "UsageError"),)
"""User errors of other packages (module, class name): W&B's UsageError says what to do ("No API key configured.
Use `wandb login` ..."; W&B online without a key). Looked up only in modules already imported: an exception of a
class from a module never imported cannot occur, and importing wandb just to name one would slow every command."""


def user_error_types(also: Tuple[Type[BaseException], ...] = ()) -> Tuple[Type[BaseException], ...]:
    """The exception classes `run_cli` reports as user errors."""
    found = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
             *also]
    for module, name in _DEFINED_ELSEWHERE:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def one_line(err: BaseException) -> str:
    """The message on one line: multi-line messages (key listings) are joined; an OS error names its file."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror and err.filename:  # "[Errno 2] ..." -> "No such file ...: path"
        text = f"{err.strerror}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def _quiet_interrupt(hook):
    """`sys.excepthook` printing no traceback for KeyboardInterrupt; the rest as `hook` does."""
    def quiet(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            hook(kind, value, traceback)
    return quiet


@contextmanager
def _sigterm_as_exit(enabled: bool) -> Iterator[None]:
    """While enabled, a SIGTERM (`kill`, a scheduler's stop) raises SystemExit(143) in the main thread, so `finally`
    blocks and staged output folders clean up (Python's default death skips them all); the old handler after."""
    if not enabled or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


STOP_ECHO_S = 5.0
"""After a Ctrl-C, how long another stop signal is taken for the launcher's echo of it and ignored: accelerate's
one-process launcher sends SIGTERM at once (SIGKILL 5 s later), torchrun's agent SIGINT again. The SIGTERM killed a
training process mid-clean-up, before it said where to resume (2 of 4 Ctrl-Cs of a toy run here)."""


@contextmanager
def _stop_once() -> Iterator[None]:
    """A SIGINT raises KeyboardInterrupt; a SIGINT or SIGTERM within STOP_ECHO_S of it is ignored (the clean-up
    finishes and the process ends by SIGINT), one later stops it as it would have. The SIGTERM handler is there from
    the start: installed by the SIGINT's, it came too late when both arrived during one C call (a checkpoint
    write), and SIGTERM's default action killed the process (2 of 6 Ctrl-Cs). A lone SIGTERM still ends the
    process as before, at the next Python instruction rather than inside a C call (a launcher's SIGKILL follows)."""
    on_term = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or on_term is None or on_term is signal.SIG_IGN \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    since: list = []

    def stop(signum, frame):
        if since and time.monotonic() - since[0] < STOP_ECHO_S:
            return  # the launcher's echo of the Ctrl-C being handled
        if signum == signal.SIGINT:
            since[:] = [time.monotonic()]
            raise KeyboardInterrupt
        signal.signal(signum, on_term)  # a kill: as before
        if callable(on_term):
            on_term(signum, frame)
        os.kill(os.getpid(), signum)  # the default action

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if not since:  # once stopping, the handlers stay until the process has ended
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, on_term)


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as `warning: <text>` lines, each text once (a file:line and a source line, twice over, before)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        yield
        return
    seen = set()

    def one_line(message, category, filename, lineno, line=None) -> str:
        text = " ".join(str(message).split())
        if text in seen:
            return ""
        seen.add(text)
        kind = "" if category is UserWarning else f"{category.__name__}: "  # a library's deprecation stays one
        return f"warning: {kind}{text}\n"
    before, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        yield
    finally:
        warnings.formatwarning = before


def run_cli(main: Callable[[], int], also: Tuple[Type[BaseException], ...] = (), sigterm: bool = True) -> int:
    """`main()`'s exit code; a user error (see `user_error_types`; `also` adds classes) prints `error: ...` to
    stderr and gives 2; Ctrl-C prints one line (with the interrupt's text, if `main` gave it one) and ends the
    process by SIGINT, without a traceback (a launcher's echo of it is ignored, `_stop_once`); warnings are
    one line each (`_one_line_warnings`). Anything else propagates with its traceback: a bug for us to fix.
    `sigterm`: a kill cleans up as an exception does (`_sigterm_as_exit`); not for training, whose processes the
    launcher stops together."""
    with _sigterm_as_exit(sigterm), _stop_once(), _one_line_warnings():
        try:
            return main()
        except KeyboardInterrupt as stop:  # Ctrl-C: what the user did, not a bug (a 35-frame traceback said so)
            if os.environ.get(DEBUG_ENV, "") in ("", "0"):
                if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per process
                    print(f"\nstopped (Ctrl-C){f'. {stop}' if str(stop) else ''}", file=sys.stderr)
                sys.excepthook = _quiet_interrupt(sys.excepthook)
            raise  # Python then dies by SIGINT, as a shell loop expects (an exit code 130 would let it go on)
        except BrokenPipeError:
            try:  # the output it failed to write is still buffered: flushing fails again if stdout is the broken pipe
                sys.stdout.flush()
            except BrokenPipeError:  # the reader of stdout went away (`t2i-score ... | head`): stop quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
                return 1
            raise  # another pipe (a service's socket): a bug to see in full
        except user_error_types(also) as err:  # evaluated when an exception arrives, after main's imports
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            # a config mistake every process of a launch meets alike: said by each machine's first process only
            if not getattr(err, "once_per_machine", False) or os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Exception as err:  # a full disk is the machine's, not ours: one line (a failed write was a traceback)
            if not is_disk_error(err) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"error: {one_line(err)}: {DISK_HINT}", file=sys.stderr)
            return EXIT_USER_ERROR


def load_refusal(err: BaseException) -> str:
    """torch.load(weights_only=True)'s error in a few words: for a refused pickle its reason, without torch's
    advice to load with weights_only=False (never for a file from elsewhere) and its terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|Check the documentation|$)", text, re.S)
    if found:
        return f"a pickle that weights_only loading refuses ({' '.join(found.group(1).split()).split('. ')[0][:200]})"
    return f"{type(err).__name__}: {' '.join(text.split())[:200]}"


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
"""A full disk, a quota reached, a read-only file system: `run_cli` says so in one line."""
DISK_HINT = "free space or write elsewhere, then run again"


def is_disk_error(err: BaseException) -> bool:
    """An OSError of DISK_ERRORS, or safetensors' error for one, which is not an OSError ("Error while serializing:
    I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno in DISK_ERRORS
    code = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return code is not None and int(code.group(1)) in DISK_ERRORS


def describe(err: Optional[BaseException]) -> Optional[Tuple[bool, str]]:
    """`err` as (whether it is a user error, one line of text), to tell the other processes of a run: they must all
    stop (else they wait in their next collective until the run's timeout), and an exception object may not pickle."""
    if err is None:
        return None
    if isinstance(err, user_error_types()):
        return True, one_line(err)
    if is_disk_error(err):  # one line on every process, as `run_cli` says it
        return True, f"{one_line(err)}: {DISK_HINT}"
    return False, f"{type(err).__name__}: {one_line(err)}"


def raise_told(told: Optional[Tuple[bool, str]], context: str) -> None:
    """Raise what another process `describe`d (a user error stays one: one line, exit code 2); nothing if None."""
    if told is not None:
        user, text = told
        raise (UserError if user else RuntimeError)(f"{context}: {text}")
