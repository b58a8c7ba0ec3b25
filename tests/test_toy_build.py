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


def test_pipeline_text_encoder_is_the_toy_clip_text_tower():
    from open_clip.model import CLIP

    from t2i_align.toy.architectures import text_encoder_from_clip, toy_clip_config

    torch.manual_seed(0)
    clip = CLIP(**toy_clip_config()).eval()
    encoder = text_encoder_from_clip(clip.state_dict())
    ids = torch.full((2, 77), 49407)  # padded with end-of-text, as the SD tokenizer pads
    ids[:, 0] = 49406
    ids[0, 1:4] = torch.tensor([320, 1125, 539])
    ids[1, 1:6] = torch.tensor([320, 1449, 2368, 1125, 539])
    with torch.no_grad():
        hidden = encoder(ids).last_hidden_state
        pooled = hidden[torch.arange(2), ids.argmax(-1)] @ clip.text_projection  # open_clip pools at the first EOT
        torch.testing.assert_close(pooled, clip.encode_text(ids), atol=1e-5, rtol=1e-4)
