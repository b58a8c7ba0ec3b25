"""User errors: a mistake the user can fix ends as ONE line `error: ...` and exit code 2; tracebacks are for our bugs.

Raise `UserError` (or a subclass: `ConfigError` for settings, `reward_models.cli.UsageError` for arguments) with a
message that says what to do. Every command-line entry point runs its body through `run_cli`, which prints such
errors (and a missing file or folder, `FileNotFoundError`) as one line and returns 2. `T2I_ALIGN_DEBUG=1` re-raises
them, traceback included, for developers.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Tuple, Type

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


def run_cli(main: Callable[[], int], also: Tuple[Type[BaseException], ...] = ()) -> int:
    """`main()`'s exit code; a user error (see `user_error_types`; `also` adds classes) prints `error: ...` to
    stderr and gives 2, Ctrl-C one line and 130. Anything else propagates with its traceback: a bug for us to fix."""
    try:
        return main()
    except KeyboardInterrupt:  # Ctrl-C: what the user did, not a bug (a 35-frame traceback said otherwise)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        return 130
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
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


def describe(err: Optional[BaseException]) -> Optional[Tuple[bool, str]]:
    """`err` as (whether it is a user error, one line of text), to tell the other processes of a run: they must all
    stop (else they wait in their next collective until the run's timeout), and an exception object may not pickle."""
    if err is None:
        return None
    if isinstance(err, user_error_types()):
        return True, one_line(err)
    return False, f"{type(err).__name__}: {one_line(err)}"


def raise_told(told: Optional[Tuple[bool, str]], context: str) -> None:
    """Raise what another process `describe`d (a user error stays one: one line, exit code 2); nothing if None."""
    if told is not None:
        user, text = told
        raise (UserError if user else RuntimeError)(f"{context}: {text}")
