"""decomposed-clip (LongAlign, arXiv 2410.11817): the decomposition identity, ω, the fitted common direction
(fit once, saved, loaded: independent of the batch), gradients."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reward_models import get_reward
from reward_models.decomposed_clip import decompose, fit_common_direction, split_sentences

TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["A red circle. It is small! The background is blue; nothing else.", "a green square", "",
           "One sentence only with many words " * 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny open_clip folder (config + weights), the layout of the shipped toy CLIP."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(**TINY).eval()
    folder = tmp_path_factory.mktemp("dclip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


def test_split_sentences():
    assert split_sentences("A red circle. It is small! Blue? Yes; done.") == \
        ["A red circle.", "It is small!", "Blue?", "Yes;", "done."]
    assert split_sentences("costs 3.5 dollars") == ["costs 3.5 dollars"]
    assert split_sentences('A sign reads "OPEN." Below it, a man. He said "hi." to me.') == [  # the first two merged
        'A sign reads "OPEN."', "Below it, a man.", 'He said "hi." to me.']
    assert split_sentences('A man (who said "go!!") Then he\nleft.') == ['A man (who said "go!!")', "Then he\nleft."]
    assert split_sentences("") == [""] and split_sentences("   ") == ["   "]


def test_decomposition_identity_and_omega_one():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 16, generator=g)
    v = F.normalize(torch.randn(16, generator=g), dim=0)
    x = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    parts = decompose(t, v, x, omega=1.0)
    torch.testing.assert_close(parts["relevant"] + parts["irrelevant"], parts["total"], atol=1e-14, rtol=0)
    torch.testing.assert_close(parts["weighted"], parts["total"], atol=1e-14, rtol=0)
    torch.testing.assert_close(parts["total"], (t.double() * x.double()).sum(-1), atol=1e-14, rtol=0)
    p0 = decompose(t, v, x, omega=0.0)
    assert torch.equal(p0["weighted"], p0["relevant"])
    v64 = F.normalize(v.double(), dim=0)
    t_perp = t.double() - parts["eta"][:, None] * v64
    assert (t_perp @ v64).abs().max() < 1e-12  # t⊥ ⟂ v
    # by hand: v = (2, 0) normalises to (1, 0); t·x = 1.8 + 3.2 = 5, η = 3, t⊥ = (0, 4): relevant 3.2,
    # irrelevant 3 · 0.6 = 1.8, weighted 3.2 + 0.3 · 1.8 = 3.74
    f64 = dict(dtype=torch.float64)  # 0.6 is not exact in float32
    hand = decompose(torch.tensor([[3.0, 4.0]], **f64), torch.tensor([2.0, 0.0], **f64),
                     torch.tensor([[0.6, 0.8]], **f64), omega=0.3)
    got = {k: hand[k].item() for k in ("total", "eta", "relevant", "irrelevant", "weighted")}
    assert got == pytest.approx({"total": 5.0, "eta": 3.0, "relevant": 3.2, "irrelevant": 1.8, "weighted": 3.74},
                                abs=1e-12)


def _stub_encoder(reward, sentences, x):
    """Replace the CLIP by fixed unit vectors: `sentences` maps each sentence to its t_k, every call sees images x."""
    def pad(v):  # to the tiny CLIP's 16 dimensions
        return F.pad(torch.tensor(v), (0, 16 - len(v)))

    reward.encoder.encode_texts = lambda texts: (torch.stack([pad(sentences[s]) for s in texts]), [False] * len(texts))
    reward.encoder.encode_images = lambda images: torch.stack([pad(v) for v in x])


def _direct(model, images, prompts, split=True):
    """t = mean of normalised sentence embeddings; x = normalised image embedding; computed with open_clip only."""
    import open_clip
    from reward_models.clip import OPENAI_MEAN, OPENAI_STD

    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = model.encode_image((images - mean) / std, normalize=True)
        t = torch.stack([model.encode_text(open_clip.tokenize(split_sentences(p) if split else [p], 16),
                                           normalize=True).mean(0) for p in prompts])
    return t, x


def test_scores_follow_the_longalign_formula(tiny):
    model, folder = tiny
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reward = get_reward("decomposed-clip", checkpoint=str(folder), direction="batch", device="cpu")
    assert reward.omega == 0.3 and reward.differentiable
    scores, info = reward(images, PROMPTS)
    t, x = _direct(model, images, PROMPTS)
    v = F.normalize(t.mean(0), dim=0)
    eta = t @ v
    relevant = ((t - eta[:, None] * v) * x).sum(-1)
    irrelevant = eta * (x @ v)
    torch.testing.assert_close(scores, relevant + 0.3 * irrelevant, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(info["total"]), (t * x).sum(-1), atol=1e-5, rtol=1e-4)
    total, rel, irr = (torch.tensor(info[k], dtype=torch.float64) for k in ("total", "relevant", "irrelevant"))
    torch.testing.assert_close(rel + irr, total, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(info["weighted"]), scores, atol=1e-6, rtol=0)
    assert info["truncated"] == 1 and info["direction"] == "batch"
    # by hand, on stub embeddings: t = mean of the sentences' vectors = (.5, .5), (-.5, .5); batch v = (0, 1),
    # η = .5, .5; x = (.6, .8), (.8, .6): total .7, -.1; relevant .3, -.4; irrelevant .4, .3; S = .42, -.31
    _stub_encoder(reward, {"a.": [1.0, 0.0], "b.": [0.0, 1.0], "c.": [-1.0, 0.0]}, [[0.6, 0.8], [0.8, 0.6]])
    scores, info = reward(torch.zeros(2, 3, 32, 32), ["a. b.", "c. b."])
    assert scores.tolist() == pytest.approx([0.42, -0.31], abs=1e-6)
    assert {k: info[k] for k in ("total", "relevant", "irrelevant", "eta")} == {
        "total": pytest.approx([0.7, -0.1], abs=1e-6), "relevant": pytest.approx([0.3, -0.4], abs=1e-6),
        "irrelevant": pytest.approx([0.4, 0.3], abs=1e-6), "eta": pytest.approx([0.5, 0.5], abs=1e-6)}


def test_omega_one_gives_the_plain_score(tiny):
    model, folder = tiny
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a red circle", "a blue square"]  # one sentence each: t is a unit vector, S is the CLIP cosine
    scores, _ = get_reward("decomposed-clip", checkpoint=str(folder), omega=1.0, device="cpu")(images, prompts)
    plain, _ = get_reward("clip", checkpoint=str(folder), scale=1.0, device="cpu")(images, prompts)
    torch.testing.assert_close(scores, plain, atol=1e-6, rtol=1e-5)


def test_gradients_reach_the_images(tiny):
    _, folder = tiny
    images = torch.rand(3, 3, 40, 36, requires_grad=True)
    reward = get_reward("decomposed-clip", checkpoint=str(folder), fit_prompts=PROMPTS, device="cpu")
    scores, _ = reward(images, PROMPTS[:3])
    scores.sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    # the gradient is the score's: its derivative along a random direction v matches a central difference
    v = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ahead, behind = (reward(images + h * v, PROMPTS[:3])[0].sum().item() for h in (1e-2, -1e-2))
    assert (images.grad * v).sum().item() == pytest.approx((ahead - behind) / 2e-2, rel=0.02)


def test_fit_common_direction_by_hand():
    vectors = {"a": [3.0, 0.0], "b": [0.0, 4.0], "c": [0.0, 0.0]}
    fake = lambda ps: torch.tensor([vectors[p] for p in ps])  # noqa: E731
    # mean of t = (1, 4/3) -> normalised (0.6, 0.8); chunking does not change the mean
    for chunk in (1, 2, 4096):
        torch.testing.assert_close(fit_common_direction(fake, ["a", "b", "c"], chunk), torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="at least one"):
        fit_common_direction(fake, [])


def test_fixed_direction_round_trip(tiny, tmp_path):
    from reward_models.decomposed_clip import save_direction

    model, folder = tiny
    fit_on = PROMPTS + ["a yellow triangle. On black."]
    reward = get_reward("decomposed-clip", checkpoint=str(folder), fit_prompts=fit_on, device="cpu")
    t_fit, _ = _direct(model, torch.zeros(1, 3, 32, 32), fit_on)
    v = reward.direction
    torch.testing.assert_close(v, F.normalize(t_fit.mean(0), dim=0), atol=1e-6, rtol=1e-5)
    path = tmp_path / "direction.safetensors"
    reward.save_direction(path)
    # a resumed run or another process: loads the very same vector and how it was fitted
    loaded = get_reward("decomposed-clip", checkpoint=str(folder), direction=str(path), device="cpu")
    assert torch.equal(loaded.direction, v)
    assert loaded.direction_metadata["num_prompts"] == "5" and len(loaded.direction_metadata["prompts_sha256"]) == 64
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batch, info = loaded(images, PROMPTS[:3])
    alone, _ = loaded(images[:1], PROMPTS[:1])  # a fixed v makes each score independent of the batch
    torch.testing.assert_close(alone, batch[:1], atol=1e-6, rtol=1e-5)
    t, x = _direct(model, images, PROMPTS[:3])
    eta = t @ v
    relevant, irrelevant = ((t - eta[:, None] * v) * x).sum(-1), eta * (x @ v)
    torch.testing.assert_close(batch, relevant + 0.3 * irrelevant, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(info["relevant"]), relevant, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(info["irrelevant"]), irrelevant, atol=1e-5, rtol=1e-4)
    assert info["direction"] == "fixed"
    # by hand, a saved v = (3, 4) loads as (.6, .8); stub t = (.5, .5), (.6, .8) (sentence means), x = e1, e2:
    # η = .7, 1; total .5, .8; irrelevant .7·.6 = .42, 1·.8 = .8; relevant .08, 0; S = .08 + .126, .24
    save_direction(tmp_path / "hand.safetensors", F.pad(torch.tensor([3.0, 4.0]), (0, 14)), {"split": "True"})
    hand = get_reward("decomposed-clip", checkpoint=str(folder), direction=str(tmp_path / "hand.safetensors"),
                      device="cpu")
    _stub_encoder(hand, {"a.": [1.0, 0.0], "b.": [0.0, 1.0], "c": [0.6, 0.8]}, [[1.0, 0.0], [0.0, 1.0]])
    scores, info = hand(torch.zeros(2, 3, 32, 32), ["a. b.", "c"])
    assert scores.tolist() == pytest.approx([0.206, 0.24], abs=1e-6)
    assert {k: info[k] for k in ("total", "relevant", "irrelevant", "eta")} == {
        "total": pytest.approx([0.5, 0.8], abs=1e-6), "relevant": pytest.approx([0.08, 0.0], abs=1e-6),
        "irrelevant": pytest.approx([0.42, 0.8], abs=1e-6), "eta": pytest.approx([0.7, 1.0], abs=1e-6)}
    with pytest.raises(FileNotFoundError, match="save_direction"):
        loaded.load_direction(tmp_path / "absent.safetensors")


def test_fit_prompts_from_a_file(tiny, tmp_path):
    _, folder = tiny
    listed = get_reward("decomposed-clip", checkpoint=str(folder), fit_prompts=PROMPTS[:2], device="cpu")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n")  # blank lines are skipped
    from_file = get_reward("decomposed-clip", checkpoint=str(folder), fit_prompts=str(tmp_path / "prompts.txt"),
                           device="cpu")
    torch.testing.assert_close(from_file.direction, listed.direction)


def test_no_direction_is_an_error_unless_omega_is_one(tiny):
    _, folder = tiny
    with pytest.raises(ValueError, match="direction=FILE"):
        get_reward("decomposed-clip", checkpoint=str(folder), device="cpu")
    with pytest.raises(ValueError, match="not both"):
        get_reward("decomposed-clip", checkpoint=str(folder), direction="batch", fit_prompts=PROMPTS, device="cpu")
    for omega in (-0.3, 3.0):  # a sign or decimal typo: the text-irrelevant part rewarded, not damped
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            get_reward("decomposed-clip", checkpoint=str(folder), omega=omega, direction="batch", device="cpu")
    images = torch.rand(2, 3, 32, 32)
    plain = get_reward("decomposed-clip", checkpoint=str(folder), omega=1.0, device="cpu")
    scores, info = plain(images, PROMPTS[:2])  # S_1 = t·x for every v: nothing to decompose or fit
    batch, _ = get_reward("decomposed-clip", checkpoint=str(folder), omega=1.0, direction="batch",
                          device="cpu")(images, PROMPTS[:2])
    torch.testing.assert_close(scores, batch, atol=1e-6, rtol=1e-5)
    assert info["direction"] == "none" and "relevant" not in info


def test_loading_a_direction_that_does_not_fit_fails(tiny, tmp_path):
    from reward_models.decomposed_clip import save_direction

    _, folder = tiny
    save_direction(tmp_path / "wide.safetensors", torch.ones(8), {"split": "True"})
    with pytest.raises(ValueError, match="16-d"):
        get_reward("decomposed-clip", checkpoint=str(folder), direction=str(tmp_path / "wide.safetensors"))
    save_direction(tmp_path / "unsplit.safetensors", torch.ones(16), {"split": "False"})
    with pytest.raises(ValueError, match="split=False"):
        get_reward("decomposed-clip", checkpoint=str(folder), direction=str(tmp_path / "unsplit.safetensors"))
    # a weights file given as the direction, a file that is not safetensors: a SafetensorError's traceback
    from safetensors.torch import save_file

    from reward_models.base import CheckpointMismatchError

    save_file({"weight": torch.ones(16)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "text.safetensors").write_text("a direction")
    for name, told in (("weights", "holds no 'direction' tensor"), ("text", "is not a readable .safetensors")):
        with pytest.raises(CheckpointMismatchError, match=f"{name}.safetensors {told}"):
            get_reward("decomposed-clip", checkpoint=str(folder), direction=str(tmp_path / f"{name}.safetensors"))


def test_a_direction_fitted_with_another_clip_of_the_same_width_is_refused(tiny, tmp_path):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from reward_models.decomposed_clip import load_direction, save_direction

    _, folder = tiny
    torch.manual_seed(1)  # same architecture and width, other weights: a direction of the same shape
    other = tmp_path / "other"
    other.mkdir()
    (other / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in CLIP(**TINY).state_dict().items()},
              str(other / "open_clip_model.safetensors"))
    path = tmp_path / "direction.safetensors"
    get_reward("decomposed-clip", checkpoint=str(other), fit_prompts=PROMPTS, device="cpu").save_direction(path)
    with pytest.raises(ValueError, match="another text encoder"):
        get_reward("decomposed-clip", checkpoint=str(folder), direction=str(path), device="cpu")
    mine = get_reward("decomposed-clip", checkpoint=str(other), direction=str(path), device="cpu")
    assert torch.equal(mine.direction, load_direction(path)[0])  # its own encoder passes the check
    # a file from before the fingerprint (no probe tensor) still loads, unchecked
    v, meta = load_direction(path)
    save_direction(tmp_path / "old.safetensors", v, meta)
    old = get_reward("decomposed-clip", checkpoint=str(folder), direction=str(tmp_path / "old.safetensors"))
    assert torch.equal(old.direction, v)


def test_the_float64_maths_is_float32_on_mps_which_has_no_float64(tiny, monkeypatch):
    from reward_models import decomposed_clip

    assert decomposed_clip.exact_dtype(torch.device("cpu")) == torch.float64
    assert decomposed_clip.exact_dtype(torch.device("cuda", 0)) == torch.float64
    assert decomposed_clip.exact_dtype(torch.device("mps")) == torch.float32
    asked = []  # every float64 step asks for its dtype: as on MPS, answer float32
    monkeypatch.setattr(decomposed_clip, "exact_dtype", lambda device: asked.append(device.type) or torch.float32)
    parts = decompose(torch.tensor([[3.0, 4.0]]), torch.tensor([2.0, 0.0]), torch.tensor([[0.6, 0.8]]), omega=0.3)
    assert {p.dtype for p in parts.values()} == {torch.float32} and parts["weighted"].item() == pytest.approx(3.74)
    assert asked == ["cpu"]
    fit_common_direction(lambda ps: torch.ones(len(ps), 2), ["a", "b"])
    assert asked == ["cpu", "cpu"]
    reward = get_reward("decomposed-clip", checkpoint=str(tiny[1]), omega=1.0, device="cpu")
    _stub_encoder(reward, {"a.": [1.0, 0.0]}, [[0.6, 0.8]])
    assert reward(torch.zeros(1, 3, 32, 32), ["a."])[0].item() == pytest.approx(0.6)
    assert asked == ["cpu"] * 3


def test_a_batch_direction_warns_once_of_a_batch_of_one_prompt(tiny, tmp_path, capsys):
    """v = normalize(t) for one prompt: t⊥ = 0 and the score is ω·S, nothing decomposed, as in the released code.
    train.batch_size=1 is refused; a training batch that happens to hold copies of one prompt raised, hours into a
    run: now warned once and scored as the released code would. t2i-score refuses a batch direction at any
    --batch-size (its scores would depend on their neighbours)."""
    import warnings

    from t2i_align.config import ConfigError, load_config
    from t2i_align.objectives.reward_backprop import build_reward

    _, folder = tiny
    reward = get_reward("decomposed-clip", checkpoint=str(folder), direction="batch", omega=0.3, device="cpu")
    images = torch.rand(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="got a batch of one prompt .* nothing is decomposed"):
        score, info = reward(images[:1], PROMPTS[:1])
    assert score.tolist() == pytest.approx([0.3 * info["total"][0]], rel=1e-5)  # ω·S
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        score, info = reward(images, PROMPTS[:1] * 2)  # copies of one (a prompt's seeds)
    assert score.tolist() == pytest.approx([0.3 * s for s in info["total"]], rel=1e-5)
    cfg = load_config("configs/toy/longalign_reward.yaml", [f"output_dir={tmp_path}", "train.batch_size=1",
                                                            "reward_backprop.reward_options.direction=batch"])
    with pytest.raises(ConfigError, match="direction=batch with train.batch_size=1"):
        build_reward(SimpleNamespace(cfg=cfg), cfg.reward_backprop, "toy:train-long")
    from PIL import Image

    from reward_models.cli import main as score

    images = tmp_path / "images"
    images.mkdir()
    for i, prompt in enumerate(PROMPTS[:2]):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
    (images / "metadata.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "prompt": p}) + "\n"
                                                   for i, p in enumerate(PROMPTS[:2])))
    args = ["--reward", "decomposed-clip", "--option", f"decomposed-clip.checkpoint={folder}", "--option",
            "decomposed-clip.direction=batch", "--images", str(images), "--device", "cpu"]
    for size in (1, 2):
        assert score([*args, "--batch-size", str(size), "--out", str(tmp_path / "s.jsonl")]) == 2
        assert "fit the direction once instead" in capsys.readouterr().err
