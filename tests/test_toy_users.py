"""Toy users for PPD (t2i_align/toy/users.py): hidden background tastes, judge-based labels, and a VLM-free encoder
whose embeddings tell users apart."""
import random

import numpy as np
import pytest
import torch

from helpers import one_torch_thread  # noqa: F401
from t2i_align.toy.judge import read_attributes
from t2i_align.toy.scenes import Scene, all_scenes, render, split_scenes
from t2i_align.toy.users import (NUM_SHOTS, Shot, ToyUser, ToyUserEncoder, make_toy_users, named_attributes,
                                 rendered_shots, user_caption)


def test_users_are_seeded_and_the_first_six_differ():
    users = make_toy_users(8, seed=0)
    assert users == make_toy_users(8, seed=0)
    assert [u.user_id for u in users] == list(range(8))
    assert len({u.ranking for u in users[:6]}) == 6  # all 3! rankings of the backgrounds
    assert users[6].ranking == users[0].ranking and users[7].ranking == users[1].ranking
    assert [u.ranking for u in make_toy_users(6, seed=1)] != [u.ranking for u in users[:6]]
    with pytest.raises(ValueError, match="every background"):
        ToyUser(0, ("white", "white", "black"))


def test_utility_and_labels_by_hand():
    user = ToyUser(3, ("gray", "white", "black"))
    assert [user.utility(b) for b in ("gray", "white", "black", None)] == [1.0, 0.5, 0.0, -1.0]
    assert user.favourite == "gray"
    assert user.label("gray", "black") == 1.0
    assert user.label("black", "white") == 0.0
    assert user.label("white", "white") == 0.5


def test_labels_from_rendered_images():
    user = ToyUser(0, ("black", "gray", "white"))
    on = lambda bg: render(Scene("red", "circle", "large", "top left", bg))  # noqa: E731
    assert user.label_images(on("white"), on("black")) == 0.0
    assert user.label_images(on("gray"), on("white")) == 1.0
    assert user.label_images(on("gray"), on("gray")) == 0.5


def test_user_captions_leave_the_background_free():
    scene = Scene("red", "circle", "large", "top left", "white")
    assert user_caption(scene) == "a large red circle at the top left"
    for s in all_scenes():
        assert "background" not in user_caption(s) and s.background not in user_caption(s)
        named = named_attributes(user_caption(s))
        assert named == {k: v for k, v in s.as_dict().items() if k != "background"}
    with pytest.raises(ValueError, match="not a toy user caption"):
        named_attributes("a large red circle at the top left on a white background")


def test_colour_as_the_free_attribute():
    scene = Scene("red", "circle", "large", "top left", "white")
    assert user_caption(scene, "color") == "a large circle at the top left on a white background"
    for s in all_scenes():
        named = named_attributes(user_caption(s, "color"), "color")
        assert named == {k: v for k, v in s.as_dict().items() if k != "color"}
    with pytest.raises(ValueError, match="not a toy user caption"):  # a background-free caption names the colour
        named_attributes("a large red circle at the top left", "color")
    with pytest.raises(ValueError, match="free attribute"):
        user_caption(scene, "shape")
    users = make_toy_users(30, seed=0, attribute="color")
    assert len({u.ranking for u in users}) == 30 and all(u.attribute == "color" for u in users)
    assert make_toy_users(6, seed=0) == make_toy_users(6, seed=0, attribute="background")  # the default unchanged
    user = ToyUser(0, ("blue", "red", "green", "yellow", "purple"), "color")
    assert [user.utility(c) for c in ("blue", "red", "purple")] == [1.0, 0.75, 0.0]
    in_colour = lambda c: render(Scene(c, "circle", "large", "top left", "gray"))  # noqa: E731
    assert user.label_images(in_colour("red"), in_colour("blue")) == 0.0
    with pytest.raises(ValueError, match="every color"):
        ToyUser(0, ("gray", "white", "black"), "color")
    shots = rendered_shots(user, all_scenes(), 6, random.Random(0))
    for shot in shots:
        pref, dispref = (read_attributes(im)["color"] for im in (shot.preferred, shot.dispreferred))
        assert user.ranking.index(pref) < user.ranking.index(dispref)
        assert not any(c in shot.caption for c in user.ranking)


def test_rendered_shots_follow_the_users_taste():
    user = make_toy_users(6, seed=0)[4]
    shots = rendered_shots(user, all_scenes(), 12, random.Random(0))
    assert len(shots) == 12
    for shot in shots:
        pref, dispref = (read_attributes(im)["background"] for im in (shot.preferred, shot.dispreferred))
        assert user.ranking.index(pref) < user.ranking.index(dispref)
        assert shot.caption.split()[0] == "a" and "background" not in shot.caption


def test_encoder_tokens_are_feature_differences_by_hand():
    # fake features: [red channel of pixel (0, 0) / 255, 1]
    enc = ToyUserEncoder(lambda ims: torch.tensor([[im[0, 0, 0] / 255.0, 1.0] for im in ims]))
    image = lambda v: np.full((4, 4, 3), v, dtype=np.uint8)  # noqa: E731
    shots = [Shot("c", image(255), image(51)), Shot("c", image(0), image(102))]
    tokens = enc.encode(shots)
    assert tokens.shape == (2, 2)
    assert torch.allclose(tokens, torch.tensor([[0.8, 0.0], [-0.4, 0.0]]))
    with pytest.raises(ValueError, match="same, non-zero number of shots"):
        enc.encode_many([shots, shots[:1]])


@pytest.fixture(scope="module")
def toy_encoder():
    return ToyUserEncoder.from_toy_clip()


def test_toy_clip_encoder_separates_users_by_taste(toy_encoder):
    """Nearest-centroid over the six tastes on held-out scenes: well above the 1/6 chance."""
    enc = toy_encoder
    users = make_toy_users(6, seed=0)
    train, heldout = split_scenes()
    rng = random.Random(1)
    per_user = 10
    fit = enc.encode_many([rendered_shots(u, train, NUM_SHOTS, rng) for u in users for _ in range(per_user)])
    test = enc.encode_many([rendered_shots(u, heldout, NUM_SHOTS, rng) for u in users for _ in range(per_user)])
    assert fit.shape == (6 * per_user, NUM_SHOTS, 64)
    centroids = fit.mean(1).reshape(6, per_user, -1).mean(1)
    predicted = torch.cdist(test.mean(1), centroids).argmin(1)
    truth = torch.arange(6).repeat_interleave(per_user)
    accuracy = (predicted == truth).float().mean().item()
    # 0.717 when written (errors: users who share a favourite or a least-liked background); chance 0.167
    assert accuracy >= 0.5
    # the favourite alone is easier: it shows in every shot that includes it
    favourite = torch.tensor([users[i].favourite == users[j].favourite for i, j in zip(predicted, truth)])
    assert favourite.float().mean().item() >= 0.75


def test_toy_user_table_drives_the_toy_unets_user_branch(toy_encoder, tmp_path):
    """The pieces fit: toy embeddings [4, 64] -> UserTable -> tokens -> the shipped toy UNet's branch."""
    from diffusers import UNet2DConditionModel

    from t2i_align.conditioning.users import add_user_branch, user_added_cond
    from t2i_align.toy.assets import pipeline_dir
    from t2i_align.users import UserTable

    users = make_toy_users(3, seed=0)
    rng = random.Random(2)
    embeddings = toy_encoder.encode_many([rendered_shots(u, all_scenes(), NUM_SHOTS, rng) for u in users])
    table = UserTable.load(UserTable([u.user_id for u in users], embeddings).save(tmp_path / "u.safetensors"), dim=64)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir()), subfolder="unet")
    x, t, h = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = unet(x, t, h).sample
        add_user_branch(unet, user_dim=table.dim, num_tokens=table.num_tokens)
        tokens = table.tokens([2, 0])
        out = unet(x, t, h, added_cond_kwargs=user_added_cond(tokens, unet)).sample
        # a "trained" branch: to_v_ip no longer zero, so each row's output depends on its user's tokens
        gen = torch.Generator().manual_seed(0)
        for name, param in unet.named_parameters():
            if "to_v_ip" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
        same_x, same_t, same_h = x[:1].expand(2, -1, -1, -1), t[:1].expand(2), h[:1].expand(2, -1, -1)
        trained = unet(same_x, same_t, same_h, added_cond_kwargs=user_added_cond(tokens, unet)).sample
    assert tokens.shape == (2, NUM_SHOTS, 64)
    assert torch.equal(tokens[0], embeddings[2])
    assert torch.equal(out, base)  # untrained branch
    assert not torch.allclose(trained[0], trained[1])  # users 2 and 0 on the same input


def test_a_perfect_shot_reader_names_the_favourite_only_when_the_shots_allow():
    from t2i_align.toy.users import ToyUser, favourite_read_right

    user = ToyUser(0, ("black", "white", "gray"))
    # black > white: rankings BWG, BGW, GBW remain; black is the favourite in 2 of them -> named
    assert favourite_read_right(user, [("black", "white")]) == 1.0
    # white > gray (held-out user 31's four shots): WGB, WBG, BWG; white leads 2 to 1 -> black never named
    assert favourite_read_right(user, [("white", "gray")] * 4) == 0.0
    # white > gray and black > gray: WBG, BWG -> a coin flip between white and black
    assert favourite_read_right(user, [("white", "gray"), ("black", "gray")]) == 0.5
    assert favourite_read_right(user, []) == pytest.approx(1 / 3)  # no shots: three favourites tie
    assert favourite_read_right(user, [("black", "white"), ("white", "gray")]) == 1.0  # only BWG is left
