"""Where the shipped toy-world weights live, and their integrity check (sha256 of every file)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..files import write_json_atomic
from ..errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"


def rebuild_hint(root: Optional[Path] = None) -> str:
    """How to rebuild the assets in root (the shipped folder when None)."""
    out = "" if root is None or Path(root).resolve() == ASSETS_DIR.resolve() else f" --out {root}"
    return f"Rebuild them with `python -m t2i_align.toy build{out}` (about an hour on 2 CPU cores)."


REBUILD_HINT = rebuild_hint()


class ToyAssetError(UserError, RuntimeError):
    """The toy assets are missing or damaged."""


def pipeline_dir(root: Optional[Path] = None) -> Path:
    """The shipped tiny Stable Diffusion pipeline (genuine diffusers format)."""
    return Path(root or ASSETS_DIR) / "pipeline"


def clip_dir(root: Optional[Path] = None) -> Path:
    """The shipped toy open_clip model (open_clip_config.json + open_clip_model.safetensors)."""
    return Path(root or ASSETS_DIR) / "toy_clip"


def denscore_dir(root: Optional[Path] = None) -> Path:
    """The toy Denscore (toy/denscore.py): LongAlign's long-text reward for the toy world, same format."""
    return Path(root or ASSETS_DIR) / "toy_denscore"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): _sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, meta: dict) -> None:
    write_json_atomic(root / MANIFEST, dict(meta, files=file_hashes(root)), sort_keys=True)


def read_manifest(root: Optional[Path] = None) -> dict:
    path = Path(root or ASSETS_DIR) / MANIFEST
    if not path.is_file():
        raise ToyAssetError(f"toy assets not found: {path} is missing. {rebuild_hint(root)}")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, TypeError, AttributeError):  # torn, or not a manifest of ours
        raise ToyAssetError(f"{path} is not a readable toy-asset manifest (no file list). "
                            f"{rebuild_hint(root)}") from None
    return manifest


def verify_assets(root: Optional[Path] = None, under: Tuple[str, ...] = ()) -> dict:
    """Check every shipped file against the manifest; raise ToyAssetError naming the damaged files. under: check
    only the files in these folders (what `build --only` keeps), every file when empty."""
    hint = rebuild_hint(root)
    root = Path(root or ASSETS_DIR)
    expected = {k: v for k, v in read_manifest(root)["files"].items() if not under or k.startswith(under)}
    actual = file_hashes(root)
    missing = sorted(set(expected) - set(actual))
    damaged = sorted(k for k in expected if k in actual and actual[k] != expected[k])
    if missing or damaged:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"hash mismatch: {', '.join(damaged)}"] if damaged else [])
        raise ToyAssetError(f"toy assets in {root} are damaged ({'; '.join(parts)}). {hint}")
    return expected
