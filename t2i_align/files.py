"""Writing user-visible folders so a reader (or a kill) sees the old version or the new one, never a mix."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move the finished folder `tmp` to `out_dir` by renames, replacing any old `out_dir` whole.

    Between the two renames `out_dir` is briefly absent (POSIX has no atomic swap of two folders); if the second
    rename fails, the old folder is put back."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    old = None
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # rename onto the fresh empty folder
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
