"""`python -m t2i_align.toy build` end to end with a tiny budget: loadable output, deterministic, atomic."""
import pytest
import torch

from t2i_align.toy.assets import file_hashes, read_manifest, verify_assets
from t2i_align.toy.build import TINY_BUDGET, build


def _quiet(_msg):
    pass


def test_tiny_build_is_loadable_and_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline

    a = build(tmp_path / "a", seed=3, budget=TINY_BUDGET, log=_quiet)
    b = build(tmp_path / "b", seed=3, budget=TINY_BUDGET, log=_quiet)
    assert file_hashes(a) == file_hashes(b)
    assert verify_assets(a) == file_hashes(a)
    assert read_manifest(a)["seed"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(str(a / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    assert not list(tmp_path.glob("*.building-*"))


def test_a_failed_build_leaves_previous_assets_untouched(tmp_path, monkeypatch):
    out = build(tmp_path / "assets", seed=0, budget=TINY_BUDGET, log=_quiet)
    before = file_hashes(out)

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("t2i_align.toy.build._save_clip", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build(out, seed=1, budget=TINY_BUDGET, log=_quiet)
    assert file_hashes(out) == before
    assert not list(tmp_path.glob("*.building-*"))
