"""Atomic writers: what they leave behind has a plain file's or folder's permissions (umask), not mkstemp's."""
import os
import stat

import numpy as np

import pytest

from t2i_align.files import replace_dir, save_safetensors_atomic, temp_dir, write_json_atomic
from t2i_align.gallery import save_grid


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    import torch

    files = [write_json_atomic(tmp_path / "a.json", {"x": 1}),
             save_safetensors_atomic(tmp_path / "t.safetensors", {"w": torch.zeros(2)}, {}),
             save_grid([np.zeros((4, 4, 3), np.uint8)], tmp_path / "grid.png")]
    assert [mode(f) for f in files] == [0o666 & ~umask] * 3
    folder = temp_dir(tmp_path, ".out.tmp-")
    (folder / "inside.txt").write_text("x")
    out = replace_dir(folder, tmp_path / "out")
    assert mode(out) == 0o777 & ~umask and (out / "inside.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "grid.png", "out", "t.safetensors"]


def test_exports_and_checkpoints_are_readable_like_any_file(tmp_path, umask):
    """safetensors 0.8 writes its files 0600 whatever the umask (safetensors#782); a run's final/ export and
    checkpoints must still be readable by whoever may read the run's other files."""
    from helpers import save_tiny_pipeline
    from t2i_align.loop import train
    from test_loop import _cfg, write_rendered_pairs

    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    data = write_rendered_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    train(_cfg(model, data, out, "lora.enabled=true", "train.max_steps=1", "train.checkpoint_every=1",
               "data.cache=true"))
    written = sorted(out.rglob("*.safetensors")) + sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert {p.parent.name for p in written} >= {"final", "step-1"} and len(written) > 3
    assert {p.name: mode(p) for p in written} == {p.name: 0o666 & ~umask for p in written}
