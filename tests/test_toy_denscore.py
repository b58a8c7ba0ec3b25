"""The toy Denscore (t2i_align/toy/denscore.py): its loss by hand, training scores what the reward scores, the
build stage, and the shipped model reading every sentence of a long caption."""
import random

import pytest
import torch

from reward_models import get_reward
from t2i_align.toy.assets import ASSETS_DIR, file_hashes, read_manifest, verify_assets
from t2i_align.toy.build import TINY_BUDGET, build
from t2i_align.toy.denscore import counterfactual, dense_text, image_retrieval, segment_loss
from t2i_align.toy.scenes import ATTRIBUTES, VALUES, Scene, long_caption, split_scenes


def _quiet(_msg):
    pass


def test_segment_loss_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_neg = torch.tensor([[[0.6, 0.8]], [[0.0, 1.0]]])
    # logits 2·t·xᵀ = [[2, 0], [0, 1]]: both directions' CE = (log(1+e^-2) + log(1+e^-1)) / 2 = 0.2200948
    # margins t·x − t·x_neg = 0.4, 0: (softplus(-0.8) + log 2) / 2 = 0.5321239
    loss = segment_loss(t, x, x_neg, torch.tensor(2.0))
    assert loss.item() == pytest.approx(0.2200948 + 0.5321239, abs=1e-6)


def test_counterfactual_changes_exactly_one_attribute():
    rng = random.Random(0)
    scene = Scene("red", "circle", "small", "top left", "white")
    for attribute in ATTRIBUTES:
        seen = {getattr(counterfactual(scene, attribute, rng), attribute) for _ in range(50)}
        assert seen == set(VALUES[attribute]) - {getattr(scene, attribute)}
        other = counterfactual(scene, attribute, rng)
        assert [a for a in ATTRIBUTES if getattr(other, a) != getattr(scene, a)] == [attribute]


def test_training_scores_the_text_as_the_reward_does():
    reward = get_reward("decomposed-clip", checkpoint="toy", omega=1.0)
    captions = [long_caption(s, random.Random(i)) for i, s in enumerate(split_scenes()[1][:3])] + ["a red circle"]
    with torch.no_grad():
        t = dense_text(reward.encoder.model, reward.encoder.tokenizer, reward.encoder.context_length, captions)
    torch.testing.assert_close(t, reward.text_vectors(captions)[0], atol=1e-6, rtol=1e-5)


def test_build_only_denscore_keeps_every_other_file(tmp_path):
    out = build(tmp_path / "assets", seed=0, budget=TINY_BUDGET, log=_quiet)
    before = file_hashes(out)
    assert any(k.startswith("toy_denscore/") for k in before)
    build(out, seed=5, budget=TINY_BUDGET, log=_quiet, only="denscore")
    after = verify_assets(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("toy_denscore/") for k in changed)
    assert read_manifest(out)["denscore"]["seed"] == 5 and read_manifest(out)["seed"] == 0
    build(out, seed=0, budget=TINY_BUDGET, log=_quiet, only="denoiser")  # keeps the Denscore it finds
    assert {k: v for k, v in verify_assets(out).items() if k.startswith("toy_denscore/")} == \
        {k: v for k, v in after.items() if k.startswith("toy_denscore/")}
    with pytest.raises(ValueError, match="--only must be one of"):
        build(out, budget=TINY_BUDGET, log=_quiet, only="vae")
    with pytest.raises(ValueError, match="needs existing assets"):
        build(tmp_path / "empty", budget=TINY_BUDGET, log=_quiet, only="denscore")


@pytest.mark.skipif(not (ASSETS_DIR / "toy_denscore").is_dir(), reason="toy Denscore not built")
def test_shipped_denscore_reads_the_sentences_the_toy_clip_misses():
    scenes = split_scenes()[1][:30]  # held-out combinations: never trained on
    clip, dense = (image_retrieval(get_reward("decomposed-clip", checkpoint=c, omega=1.0), scenes)
                   for c in ("toy", "toy-denscore"))
    acc = {a: (clip[a]["accuracy"], dense[a]["accuracy"]) for a in ATTRIBUTES}
    assert acc["background"][0] < 0.6 and acc["position"][0] < 0.5, acc  # the toy CLIP reads mostly colour
    assert all(acc[a][1] >= 0.9 for a in ("color", "size", "background")) and acc["shape"][1] >= 0.7, acc
    # Known blind spot (README, LongAlign): both towers map left and right alike, top and bottom it tells apart.
    assert dense["position"]["top_bottom"] >= 0.9 and dense["position"]["accuracy"] > clip["position"]["accuracy"]


def test_a_missing_denscore_says_how_to_build_it(tmp_path, monkeypatch):
    from reward_models.base import WeightsNotFoundError

    monkeypatch.setattr("t2i_align.toy.assets.ASSETS_DIR", tmp_path)
    with pytest.raises(WeightsNotFoundError, match="build --only denscore"):
        get_reward("decomposed-clip", checkpoint="toy-denscore", omega=1.0)
