"""Writing user-visible folders so a reader (or a kill) sees the old version or the new one, never a mix."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple


def _umask() -> int:
    """The process umask, read without changing it (Linux); elsewhere set and put straight back, which briefly
    leaves other threads' new files unmasked."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shown(path: str | os.PathLike) -> str:
    """`path` for an error message: a relative one says what it is relative to (configs name data relative to the
    working directory, not to the config file)."""
    return str(path) if Path(path).is_absolute() else f"{path} (relative to the working directory {Path.cwd()})"


def given_path(value: str | os.PathLike, flag: str) -> Path:
    """The path a flag or setting names, as given (text, before any Path: Path("") is "."); UserError for an empty
    or blank one, which Path takes as the working directory: `--out ""` (an unset shell variable) wrote into it,
    `--images ""` scored it, and the messages showed `.`."""
    from .errors import UserError

    if not str(value).strip():
        raise UserError(f"{flag} is empty: give a path (an empty one would be taken as the working directory)")
    return Path(value)


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent`, to fill and then rename into place. mkdtemp makes it private (0700); it gets
    what a plain mkdir gives (0777 minus the umask), so a finished gallery or cache is as readable as any folder."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def temp_file(parent: Path, prefix: str) -> Tuple[int, str]:
    """(fd, path) of a fresh file in `parent`, with a plain file's permissions (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def plain_modes(root: Path) -> None:
    """Give `root` (a .safetensors file) or every .safetensors file under it a plain file's mode (0666 minus the
    umask). safetensors 0.8 creates its files 0600 whatever the umask (safetensors/safetensors#782): exported
    weights, checkpoints and caches would be unreadable to anyone else (a colleague, an inference server)."""
    root, mode = Path(root), 0o666 & ~_umask()
    for path in [root] if root.is_file() else root.rglob("*.safetensors"):
        os.chmod(path, mode)


def sync_tree(root: Path) -> None:
    """fsync `root` (a file or folder) and everything under it: written through to the disk, so that a host crash
    after the rename that publishes it cannot leave its files empty (a killed process cannot anyway)."""
    root = Path(root)
    for path in (sorted(root.rglob("*"), key=lambda p: -len(p.parts)) if root.is_dir() else []) + [root]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder: its entries, e.g. a rename into it). For a folder it is best effort:
    Windows cannot open one, and some network file systems refuse to fsync one (EINVAL)."""
    folder = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move the finished folder `tmp` to `out_dir` by renames, replacing any old `out_dir` whole (its .safetensors
    files given plain modes first: `plain_modes`).

    Between the two renames `out_dir` is briefly absent (POSIX has no atomic swap of two folders); if the second
    rename fails, the old folder is put back, or, if that fails too, kept where it is and named in the error.
    `tmp`'s files are fsynced first: a host crash after the old folder is deleted cannot leave the new one's files
    empty."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    plain_modes(tmp)
    sync_tree(tmp)
    old, moved = None, False
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # rename onto the fresh empty folder
            moved = True
        os.replace(tmp, out_dir)
    except BaseException:
        if moved:
            _put_back(old, out_dir)
        elif old is not None:
            old.rmdir()  # still the empty placeholder
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out_dir.parent)  # the renames themselves (best effort: the folder is in place either way)
    return out_dir


def _put_back(old: Path, out_dir: Path) -> None:
    """The old folder back at `out_dir` after a failed replacement; never deleted if it cannot go back."""
    try:
        os.replace(old, out_dir)
    except OSError as err:
        raise OSError(f"{out_dir} could not be replaced, nor put back ({err}): its old contents are kept in "
                      f"{old}; move them back by hand (once {out_dir.name} exists again, its next write deletes it)") \
            from err


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `out_dir` to fill in the `with` block; then it replaces `out_dir` whole
    (`replace_dir`), its files fsynced first, so a host crash cannot leave them empty once the old folder is gone
    (as checkpoints are). On a failure while it is filled (a full disk, Ctrl-C) it is removed: no hidden
    half-written folder is left. Once filled it is never deleted: if the replacement fails (`out_dir` a mount point,
    a handle open on Windows), it is kept under a visible name that the error gives (a run's final/ may be the only
    copy of its weights). A link (a run's gallery/ kept on another disk) stays: the folder it points to is the one
    replaced. Hidden `.NAME.tmp-*` / `.NAME.old-*` folders a killed earlier write left beside it are removed."""
    out_dir = Path(out_dir).resolve() if Path(out_dir).is_symlink() else Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out_dir)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_dir(tmp, out_dir)
    except Exception as err:
        kept = _unpublished(tmp, out_dir)
        hidden = " now (a later export deletes hidden .*.tmp-* folders)" if kept == tmp else ""
        raise OSError(f"{out_dir} could not be replaced ({err}): the new contents are kept whole in {kept}; move "
                      f"them there by hand{hidden}") from err


STALE_AFTER_S = 3600
"""A hidden .NAME.tmp-* folder this old (by its time of change) is a killed write's, not another writer's."""


def _remove_stale_stages(out_dir: Path) -> None:
    """Hidden folders a killed earlier replacement of `out_dir` left (a whole pipeline beside final/): its .tmp-*
    once STALE_AFTER_S old (a concurrent writer's is younger), its .old-* once `out_dir` is there again (else the
    .old-* may be the only copy of the folder: a kill between replace_dir's two renames, a failed put-back)."""
    now = time.time()
    for kind in ("tmp", "old"):
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            if not stale.is_dir() or stale.is_symlink():
                continue
            if (kind == "tmp" and now - stale.stat().st_mtime > STALE_AFTER_S) or (kind == "old" and out_dir.exists()):
                shutil.rmtree(stale, ignore_errors=True)


def _unpublished(tmp: Path, out_dir: Path) -> Path:
    """The finished folder `tmp` under a visible name beside `out_dir` (NAME.unpublished, -2, ...), or where it is
    if that rename fails too."""
    for n in range(1, 1000):
        kept = out_dir.with_name(f"{out_dir.name}.unpublished" + (f"-{n}" if n > 1 else ""))
        if not kept.exists():
            try:
                os.replace(tmp, kept)
                return kept
            except OSError:
                break
    return tmp


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a file via a temporary sibling, fsynced, and a rename: readers never see half of it, and a host crash
    leaves the old file or the whole new one (an unsynced rename can leave an empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            synced(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def synced(handle) -> None:
    """Flush the open file `handle` and fsync it: its bytes on disk before a rename publishes it."""
    handle.flush()
    os.fsync(handle.fileno())


def finite_json(data: Any) -> Any:
    """`data` with every NaN or ±inf float (in dicts, lists, tuples) as None: JSON has neither, and json.dumps
    would write the tokens NaN / Infinity, which strict readers (JavaScript's JSON.parse) reject."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def write_json_atomic(path: Path, data: Any, **dump_kwargs: Any) -> Path:
    """`data` as JSON, non-finite numbers as null (`finite_json`), via `write_text_atomic`."""
    text = json.dumps(finite_json(data), indent=2, default=str, allow_nan=False, **dump_kwargs)
    return write_text_atomic(path, text + "\n")


def keep_jsonl(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite the JSON-lines file `path` (atomically) with the records `keep` accepts (a resume dropping what came
    after its checkpoint). A line that is not a JSON object, such as the torn last line of a run stopped mid-write,
    is dropped too: returns how many were."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            torn += bool(line.strip())
        elif keep(record):
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return torn


def save_safetensors_atomic(path: Path, tensors: Dict[str, Any], metadata: Dict[str, str]) -> Path:
    """`safetensors.torch.save_file` via a temporary sibling and a rename (the file is complete or absent)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        plain_modes(Path(tmp))
        fsync_path(Path(tmp))  # on disk before the rename: a host crash leaves the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


BROWSER_LEFTOVERS = (".DS_Store", ".ipynb_checkpoints", "Thumbs.db", "desktop.ini", ".directory")


def browser_leftover(name: str) -> bool:
    """Whether a folder entry is what a file browser or notebook leaves (and macOS's ._* copies): no one's work."""
    return name in BROWSER_LEFTOVERS or name.startswith("._")


def check_replaceable_folder(out: Path, flag: str, tool: str) -> None:
    """UserError for a folder output that cannot be replaced whole: the current folder or one above it, a link or
    a mount point (a container's volume) cannot be renamed away (`replace_dir` failed after all the work)."""
    from .errors import UserError

    cwd = Path.cwd().resolve()
    if out.name in ("", "..") or out.resolve() in (cwd, *cwd.parents):
        raise UserError(f"{flag} {out} is the current folder, one above it or a '..' path, which {tool} cannot "
                        f"replace whole: give a new folder, e.g. {flag} {out / 'samples'}")
    if out.is_symlink() or os.path.ismount(out):
        raise UserError(f"{flag} {out} is a {'link' if out.is_symlink() else 'mount point'}, which {tool} cannot "
                        f"replace whole (it writes a new folder and renames it into place): give a folder inside it, "
                        f"e.g. {flag} {out / 'samples'}")


def _check_writable(folder: Optional[Path], flag: str, out: Path) -> None:
    """A file made and removed in `folder` (the output's nearest existing folder): os.access says yes to root
    where the write still fails (a read-only mount, /proc), and the work would be lost at the end."""
    from .errors import UserError

    if folder is None:
        return
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".t2i-align-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot write in {folder} ({err.strerror or err}); choose another "
                        f"{flag}") from None


def check_output_path(path: str | os.PathLike, flag: str, folder: bool,
                      inputs: Optional[Dict[str, str | os.PathLike]] = None, replaces: Sequence[Path] = (),
                      overwrite: bool = False, made_by: Optional[str] = None, probe: bool = True) -> None:
    """At a command's start, before any work: UserError for an output path that cannot be written (a file where a
    folder is wanted or the reverse, a file among its parents), that is or holds one of `inputs` ({flag: path}),
    which writing there (replacing a folder) would delete, or whose writing would replace an existing one of
    `replaces` (an earlier gallery, pair set, non-empty folder...) without `overwrite` (the command's --overwrite).
    `made_by`: the file a folder this command wrote holds; --overwrite replaces no non-empty folder without it
    (`--out ~/Pictures --overwrite` deleted the user's pictures). `probe`: a file made and removed where the command
    will write (inside an existing folder it adds files to; else in the folder it is made or renamed into), so a
    folder it cannot write stops it now, not after the work."""
    from .errors import UserError

    out = given_path(path, flag) if isinstance(path, str) else Path(path)  # a Path("") is "." already
    if out.exists() and out.is_dir() != folder:
        raise UserError(f"{flag} {out} is a {'file' if folder else 'folder'}: give {'a folder' if folder else 'a file'}"
                        f" path")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{flag} {out}: {above} is a file, not a folder; choose another {flag}")
    if probe:  # where the command writes: inside an existing folder it adds to, else beside it (staged, renamed)
        inside = folder and out.is_dir() and out.resolve() not in {Path(r).resolve() for r in replaces}
        _check_writable(out if inside else above, flag, out)
    for name, source in (inputs or {}).items():
        held = Path(source) if Path(source).is_dir() else Path(source).parent
        if out.resolve() in (held.resolve(), Path(source).resolve()) or out.resolve() in held.resolve().parents:
            raise UserError(f"{flag} {out} is or holds {name} {source}: writing there would delete it; choose "
                            f"another {flag}")
    for earlier in replaces:  # a folder of empty folders holds nothing (a demo stopped before its first file)
        if not earlier.exists() or (earlier.is_dir() and not any(p.is_file() for p in earlier.rglob("*"))):
            continue
        if not overwrite:
            raise UserError(f"{earlier} exists and {flag} {path} would replace it: choose another {flag} or pass "
                            "--overwrite")
        if made_by and earlier.is_dir() and not (earlier / made_by).is_file():
            raise UserError(f"{earlier} holds files but no {made_by}, so this command did not write it, and "
                            f"--overwrite would delete it whole: choose another {flag} (or empty it yourself)")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def take_lock(path: Path, what: str, instead: str) -> Optional[int]:
    """`path` locked (flock) by this process and naming it; the descriptor is returned (closing it lets go), or
    UserError naming the process that holds it (`what` is in use; `instead`: what else to do). None where there
    are no such locks (not POSIX, a network file system without them)."""
    from .errors import UserError

    try:
        import fcntl
    except ImportError:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{what} is in use by another run ({holder}): wait for it to end or stop it, or "
                            f"{instead}") from None
        except OSError:  # ENOLCK
            os.close(fd)
            return None
        if _same_file(fd, path):  # not a file its holder unlinked as it let go (then two runs held "the" lock)
            break
        os.close(fd)
    import socket
    import time

    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    return fd
