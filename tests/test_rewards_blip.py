"""`imagereward` / `vp-score`: tiny random BLIP reward models written as checkpoints in the OFFICIAL ImageReward key
layout, loaded through our loader, and checked against a direct computation that reads the official keys itself
(a functional re-statement of BLIP's `vit.py` + `med.py` and ImageReward's `MLP` / `score`)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reward_models import get_reward
from reward_models.blip_layout import (
    BlipRewardConfig, BlipRewardModel, native_to_official, official_to_native,
)
from reward_models.imagereward import (
    _pil_to_rgb, CLIP_MEAN, CLIP_STD, IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageRewardScore, VPScore, preprocess_images,
)

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)

# vision width != text width, so the cross-attention key/value shapes prove the ViT -> BERT wiring
TINY = dict(image_size=32, patch_size=16, vision_width=24, vision_layers=2, vision_heads=2, vision_mlp=48,
            text_width=32, text_layers=2, text_heads=2, text_mlp=64, vocab_size=40, max_positions=64)
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "sofa", ",", ".", "##s"]
HEAD = ("mlp.layers.0", "mlp.layers.2", "mlp.layers.4", "mlp.layers.6", "mlp.layers.7")


def official_checkpoint(path, config=None, seed=0, extra=None):
    """Random tiny model -> official-layout state dict (plus the unused keys the real file carries) -> torch.save."""
    cfg = BlipRewardConfig(**(config or TINY))
    model, gen = BlipRewardModel(cfg), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (math.sqrt(p[0].numel()) if p.ndim > 1 else 5.0))
    state = native_to_official(model.state_dict())
    state.update({"blip.vision_proj.weight": torch.randn(8, cfg.vision_width), "blip.vision_proj.bias": torch.zeros(8),
                  "blip.text_proj.weight": torch.randn(8, cfg.text_width), "blip.text_proj.bias": torch.zeros(8),
                  "blip.text_encoder.embeddings.position_ids": torch.arange(cfg.max_positions)[None]})
    state.update(extra or {})
    torch.save(state, path)
    return state


def reference_raw(sd, pixels, ids, mask, heads=(2, 2)):
    """Direct computation on official keys: BLIP ViT (pre-norm blocks, LayerNorm eps 1e-6, final norm on all
    tokens) -> BLIP BERT (post-norm, self-attn with -10000 padding mask, cross-attn to all image tokens) -> [CLS]
    -> MLP(0, 2, 4, 6, 7) with no activations."""
    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    def attend(q, k, v, n_heads, bias=None):
        split = lambda t: t.view(t.shape[0], t.shape[1], n_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (0 if bias is None else bias)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=16)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(2):
        b = f"{v}blocks.{i}."
        qkv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(*qkv, heads[0]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    positions = sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + positions
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(2):
        for kind, context, bias in (("attention", None, pad_bias), ("crossattention", image, None)):
            a = f"{t}encoder.layer.{i}.{kind}."
            ctx = h if context is None else context
            out = attend(lin(h, a + "self.query"), lin(ctx, a + "self.key"), lin(ctx, a + "self.value"), heads[1], bias)
            h = ln(lin(out, a + "output.dense") + h, a + "output.LayerNorm", 1e-12)
        inter = F.gelu(lin(h, f"{t}encoder.layer.{i}.intermediate.dense"))
        h = ln(lin(inter, f"{t}encoder.layer.{i}.output.dense") + h, f"{t}encoder.layer.{i}.output.LayerNorm", 1e-12)
    feature = h[:, 0]
    for name in HEAD:
        feature = lin(feature, name)
    return feature.squeeze(-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return {"root": root, "tok": str(root / "tok"),
            "ir": (root / "ImageReward.pt", official_checkpoint(root / "ImageReward.pt", seed=0)),
            "vp": (root / "vp.pt", official_checkpoint(root / "vp.pt", seed=1))}


def make(cls, files, key="ir", **options):
    return cls(checkpoint=files[key][0], tokenizer=files["tok"], config=TINY, **options)


def normalise(x):
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_key_mapping_uses_the_official_layout(files):
    keys = set(files["ir"][1])
    official = [  # hand-written from THUDM/ImageReward (BLIP vit.py / med.py / ImageReward.MLP)
        "blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
        "blip.visual_encoder.blocks.1.norm1.weight", "blip.visual_encoder.blocks.1.attn.qkv.weight",
        "blip.visual_encoder.blocks.1.attn.proj.bias", "blip.visual_encoder.blocks.1.norm2.bias",
        "blip.visual_encoder.blocks.1.mlp.fc1.weight", "blip.visual_encoder.blocks.1.mlp.fc2.bias",
        "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
        "blip.text_encoder.embeddings.position_embeddings.weight", "blip.text_encoder.embeddings.LayerNorm.bias",
        "blip.text_encoder.encoder.layer.1.attention.self.query.weight",
        "blip.text_encoder.encoder.layer.1.attention.output.LayerNorm.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.output.dense.weight",
        "blip.text_encoder.encoder.layer.1.intermediate.dense.weight",
        "blip.text_encoder.encoder.layer.1.output.dense.bias",
        "mlp.layers.0.weight", "mlp.layers.2.weight", "mlp.layers.4.bias", "mlp.layers.6.weight", "mlp.layers.7.bias"]
    assert set(official) <= keys
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "blip.vision_proj.", "blip.text_proj.",
                             "mlp.layers.")) for k in keys)
    sd = files["ir"][1]
    assert sd["blip.visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 24, 24)
    assert sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 24)
    assert sd["mlp.layers.0.weight"].shape == (1024, 32) and sd["mlp.layers.7.weight"].shape == (1, 16)
    renamed, leftovers = official_to_native({**sd, "blip.itm_head.weight": torch.zeros(1)})
    assert leftovers == ["blip.itm_head.weight"]  # projections and position_ids are dropped as known-unused
    assert set(renamed) == set(BlipRewardModel(BlipRewardConfig(**TINY)).state_dict())
    assert "vision.encoder.layers.1.self_attn.projection.bias" in renamed
    assert "text.encoder.layer.1.crossattention.self.key.weight" in renamed


def test_the_normalisation_constants_are_the_official_ones():
    """Pinned, as the expected scores below are built from them: ImageReward's score statistics (ImageReward.py,
    `self.mean`, `self.std`) and CLIP's image normalisation (BLIP's preprocessing in ImageReward)."""
    from reward_models import imagereward

    assert (IMAGEREWARD_MEAN, IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    assert imagereward.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert imagereward.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("cls,key,mean,std", [(ImageRewardScore, "ir", IMAGEREWARD_MEAN, IMAGEREWARD_STD),
                                              (VPScore, "vp", IMAGEREWARD_MEAN, IMAGEREWARD_STD),
                                              (VPScore, "vp", 0.5, 2.0)])
def test_scores_match_direct_computation(files, cls, key, mean, std):
    options = {} if cls is ImageRewardScore or mean == IMAGEREWARD_MEAN else {"mean": mean, "std": std}
    reward = make(cls, files, key, **options)
    prompts = ["a photo of a cat", "a red dog on the sofa", "blue cats"]
    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))  # short side already 32
    scores, info = reward(images, prompts)
    ids, mask, _ = reward.tokenize(prompts)
    assert ids.shape == (3, 35) and (ids[:, 0] == reward.tokenizer.cls_token_id).all()
    pixels = normalise(images[..., 8:40])  # centre crop of width 48 -> 32
    raw = reference_raw(files[key][1], pixels, ids, mask)
    torch.testing.assert_close(scores, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(info["raw"]), raw, atol=1e-5, rtol=1e-5)
    assert raw.std() > 1e-3  # the tiny random model is not degenerate


def test_registered_names_and_differentiable(files):
    reward = get_reward("vp-score", checkpoint=files["vp"][0], tokenizer=files["tok"], config=TINY)
    assert isinstance(reward, VPScore) and reward.differentiable and reward.name == "vp-score"
    assert isinstance(get_reward("imagereward", checkpoint=files["ir"][0], tokenizer=files["tok"], config=TINY),
                      ImageRewardScore)
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    scores, _ = reward(images, ["a cat", "a dog"])
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


def test_any_mode_or_size(files):
    reward = make(ImageRewardScore, files, batch_size=3)
    rgb = Image.new("RGB", (48, 32))
    rgb.putdata([(i % 251, (7 * i) % 256, (3 * i) % 256) for i in range(48 * 32)])
    images = [rgb, rgb.convert("L").resize((7, 300)), rgb.convert("RGBA").resize((50, 50)),
              rgb.convert("P").resize((33, 17)), rgb.convert("CMYK"), Image.new("I;16", (20, 30), 40000),
              Image.new("F", (16, 16), 0.5), rgb.convert("1"), rgb.resize((500, 90))]
    scores, info = reward(images, ["a cat"] * len(images))
    assert scores.shape == (len(images),) and torch.isfinite(scores).all()
    as_tensor = torch.tensor(list(rgb.getdata()), dtype=torch.float32).view(32, 48, 3).permute(2, 0, 1) / 255
    torch.testing.assert_close(preprocess_images([rgb], 32), preprocess_images(as_tensor[None], 32))
    big = rgb.resize((96, 64), Image.BICUBIC)
    big_tensor = torch.tensor(list(big.getdata()), dtype=torch.float32).view(64, 96, 3).permute(2, 0, 1) / 255
    pil, torch_path = preprocess_images([big], 32), preprocess_images(big_tensor[None], 32)
    assert (pil - torch_path).abs().mean() < 0.05  # PIL vs antialiased torch bicubic agree closely
    gray, rgba = torch.rand(2, 1, 20, 30), torch.rand(2, 4, 20, 30)
    assert torch.isfinite(reward(gray, ["a", "b"])[0]).all() and torch.isfinite(reward(rgba, ["a", "b"])[0]).all()
    mixed = reward([rgb, torch.rand(3, 17, 23)], ["a cat", "a dog"])[0]
    assert mixed.shape == (2,)
    with pytest.raises(ValueError, match="empty image"):
        reward([Image.new("RGB", (0, 5))], ["a"])
    # 8-bit values of the rescaled modes (PIL's F -> L truncates): 0.5 · 255 = 127.5 -> 127; 40000 · 255 / 65535
    # = 155.6 -> 155; the same in every channel
    for image, value in ((Image.new("F", (4, 3), 0.5), 127), (Image.new("I;16", (4, 3), 40000), 155)):
        rgb8 = np.asarray(_pil_to_rgb(image))
        assert rgb8.shape == (3, 4, 3) and (rgb8 == value).all(), (image.mode, np.unique(rgb8))


def test_empty_and_overlong_prompts(files):
    reward = make(ImageRewardScore, files, batch_size=2)
    long_prompt = " ".join(["cat"] * 50)
    images = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)
    scores, info = reward(images, ["", "a cat", long_prompt, " ".join(["cat"] * 33)])
    assert info["truncated"] == 1  # a count, as the CLIP-family rewards report it (t2i-score sums it)
    assert info["prompt_tokens"] == [2, 4, 52, 35]  # [CLS] ... [SEP]
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[2], scores[3])  # 50 cats read as the 33 that fit in 35 tokens
    assert reward(images[:0], [])[0].shape == (0,)
    one_by_one = torch.cat([reward(images[i:i + 1], [p])[0] for i, p in enumerate(["", "a cat"])])
    torch.testing.assert_close(one_by_one, scores[:2], atol=1e-5, rtol=1e-5)


def test_missing_weights_name_the_file(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt.*THUDM/ImageReward"):
        ImageRewardScore(tokenizer=files["tok"], config=TINY)
    with pytest.raises(FileNotFoundError, match=r"not found at .*nowhere\.pt.*ImageReward\.pt"):
        ImageRewardScore(checkpoint=tmp_path / "nowhere.pt", tokenizer=files["tok"], config=TINY)
    with pytest.raises(FileNotFoundError, match="VisionPrefer"):
        VPScore(checkpoint=tmp_path / "vp.pt", tokenizer=files["tok"], config=TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        ImageRewardScore(checkpoint=tmp_path / "junk.pt", tokenizer=files["tok"], config=TINY)


def test_wrong_architecture_lists_keys(files, tmp_path):
    official_checkpoint(tmp_path / "deeper.pt", {**TINY, "vision_layers": 3, "text_width": 16})
    with pytest.raises(ValueError) as err:
        ImageRewardScore(checkpoint=tmp_path / "deeper.pt", tokenizer=files["tok"], config=TINY)
    text = str(err.value)
    assert "unexpected (" in text and "blip.visual_encoder.blocks.2.attn.qkv.weight" in text
    assert "wrong shape" in text and "blip.text_encoder.embeddings.word_embeddings.weight (40, 16) vs (40, 32)" in text
    official_checkpoint(tmp_path / "more_blocks.pt", {**TINY, "vision_layers": 3})  # every shape fits, one block more
    with pytest.raises(ValueError, match=r"unexpected \(12\): blip\.visual_encoder\.blocks\.2\."):
        ImageRewardScore(checkpoint=tmp_path / "more_blocks.pt", tokenizer=files["tok"], config=TINY)
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match=r"(?s)missing \(\d+\): blip\.visual_encoder.*unexpected \(1\): visual\.proj"):
        ImageRewardScore(checkpoint=tmp_path / "clip.pt", tokenizer=files["tok"], config=TINY)
    official_checkpoint(tmp_path / "small_vocab.pt", {**TINY, "vocab_size": 8})
    with pytest.raises(ValueError, match="tokenizer has 20 tokens"):
        ImageRewardScore(checkpoint=tmp_path / "small_vocab.pt", tokenizer=files["tok"],
                         config={**TINY, "vocab_size": 8})


def test_wrapped_checkpoint_and_extra_keys(files, tmp_path):
    sd = dict(files["ir"][1])
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = ImageRewardScore(checkpoint=tmp_path / "wrapped.pt", tokenizer=files["tok"], config=TINY)
    torch.save({**sd, "blip.itm_head.weight": torch.zeros(2, 32)}, tmp_path / "extra.pt")
    with pytest.warns(UserWarning, match="itm_head"):
        extra = ImageRewardScore(checkpoint=tmp_path / "extra.pt", tokenizer=files["tok"], config=TINY)
    images = torch.rand(2, 3, 32, 32)
    reference = make(ImageRewardScore, files)(images, ["a", "b"])[0]
    torch.testing.assert_close(wrapped(images, ["a", "b"])[0], reference)
    torch.testing.assert_close(extra(images, ["a", "b"])[0], reference)


def test_missing_tokenizer_and_weights_are_weights_errors_and_the_tokenizer_comes_first(files, tmp_path, monkeypatch):
    """A missing tokenizer was a plain OSError (a traceback in t2i-score), told after reading the ~1.7 GB
    checkpoint; a missing checkpoint a FileNotFoundError without t2i-score's --option hint."""
    from reward_models.base import WeightsNotFoundError

    with monkeypatch.context() as m:
        m.setattr(ImageRewardScore, "_read", lambda self, path: pytest.fail("checkpoint read before the tokenizer"))
        with pytest.raises(WeightsNotFoundError, match=r"no_tok.*pass tokenizer=FOLDER.*vocab\.txt"):
            ImageRewardScore(checkpoint=files["ir"][0], tokenizer=str(tmp_path / "no_tok"), config=TINY)
    with pytest.raises(WeightsNotFoundError, match=r"pass checkpoint=PATH.*ImageReward\.pt"):
        ImageRewardScore(tokenizer=files["tok"], config=TINY)
    # an empty folder (or a hub name not in the cache, offline) gave a tokenizer of special tokens only: every
    # word [UNK], the scores blind to the prompt; a hub name is never downloaded
    (tmp_path / "empty_tok").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name from the cache only: no minutes of retries
    for name in (str(tmp_path / "empty_tok"), "no-such-org/no-such-bert"):
        with pytest.raises(WeightsNotFoundError, match="tokenizer"):
            ImageRewardScore(checkpoint=files["ir"][0], tokenizer=name, config=TINY)
    with pytest.raises(WeightsNotFoundError, match=r"not found at .*nowhere\.pt"):
        VPScore(checkpoint=tmp_path / "nowhere.pt", tokenizer=files["tok"], config=TINY)


def test_a_hub_tokenizer_is_read_from_the_cache_first_and_fetched_with_a_note(monkeypatch, capsys):
    """Offline without HF_HUB_OFFLINE, the first call went to the network: minutes of retries, then a message
    about missing vocabulary files. The cache is read first; the network is tried after a note saying so."""
    from transformers import BertTokenizer

    from reward_models.base import WeightsNotFoundError
    from reward_models.imagereward import load_bert_tokenizer

    calls = []

    def from_pretrained(name, local_files_only=False):
        calls.append(local_files_only)
        raise OSError("not cached" if local_files_only else "connection refused")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(BertTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(WeightsNotFoundError, match="not in the local cache, and the hub could not be reached"):
        load_bert_tokenizer("some-org/some-bert")
    assert calls == [True, False] and "is not in the local Hugging Face cache: fetching it" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="could not load the BERT tokenizer 'some-org/some-bert'"):
        load_bert_tokenizer("some-org/some-bert")
    assert calls == [True]  # offline: the cache only


def test_numpy_images_score_as_the_same_tensors(files):
    reward = make(ImageRewardScore, files)
    arr = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    expected = reward(torch.stack([as_tensor, as_tensor]), ["a cat", "a dog"])[0]
    got = reward([arr, arr.astype(np.float32) / 255], ["a cat", "a dog"])[0]
    torch.testing.assert_close(got, expected)


def test_float_images_far_outside_0_1_warn():
    with pytest.warns(UserWarning, match=r"read as RGB in \[0, 1\], but these span \[0\.0\d*, 25\d\]"):
        preprocess_images(torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_images(torch.full((1, 3, 20, 20), 1.1), 32)  # a decoder's small overshoot passes


def test_half_precision_images_are_resized_in_float32():
    """bf16 resizing and normalisation were ~0.02 off (normalised units) from float32's."""
    images = torch.rand(2, 3, 50, 40, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = preprocess_images(images, 32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, preprocess_images(images.float(), 32), atol=0, rtol=0)


def test_16_bit_tensors_are_read_as_16_bit_and_a_batch_in_one_list_element_is_refused():
    """A uint16 tensor was divided by 255 (257 times too bright, no warning); a [2, C, H, W] list element was
    scored as two images for its one prompt."""
    pixels = torch.randint(0, 65536, (1, 3, 20, 20), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    as_float = pixels.float() / 65535
    torch.testing.assert_close(preprocess_images(pixels.to(torch.uint16), 32), preprocess_images(as_float, 32))
    torch.testing.assert_close(preprocess_images([pixels[0].to(torch.uint16)], 32), preprocess_images(as_float, 32))
    with pytest.raises(ValueError, match="one image per element; one holds 2"):
        preprocess_images([torch.rand(2, 3, 20, 20)], 32)
    torch.testing.assert_close(preprocess_images([as_float], 32), preprocess_images(as_float, 32))  # [1, C, H, W]
