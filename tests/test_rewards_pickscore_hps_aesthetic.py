"""pickscore, hpsv2, aesthetic and the transformers-CLIP <-> open_clip converters, on tiny random models."""
import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reward_models import get_reward
from reward_models.aesthetic import AestheticHead
from reward_models.base import (CheckpointMismatchError, RewardSetupError, WeightsNotFoundError, load_checked,
                               preprocess_images, resize_center_crop)
from reward_models.clip import OPENAI_MEAN, OPENAI_STD
from reward_models.pickscore import hf_clip_to_open_clip, hf_config_to_open_clip, hf_preprocess_cfg, \
    open_clip_to_hf_clip

TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["a red circle", "", "word " * 90]
MEAN, STD = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def tiny_open_clip(cfg=TINY, seed=0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**cfg).eval()


def tiny_hf_clip(act="gelu", image_size=32, patch_size=8):
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
    cfg = CLIPConfig(text_config=dict(common, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(common, image_size=image_size, patch_size=patch_size), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # spread the weights out so the embeddings are far from degenerate
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A transformers CLIPModel folder with tokenizer and processor config, the layout of PickScore_v1."""
    from t2i_align.toy.tokenizer import build_clip_tokenizer

    model = tiny_hf_clip()
    folder = tmp_path_factory.mktemp("hfclip")
    model.save_pretrained(str(folder), safe_serialization=True)
    build_clip_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "resample": 3,
         "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}))
    return model, folder


def _hf_direct(model, images, prompts, tokenizer):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(images - MEAN) / STD)
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(**enc)
    img, txt = (o if isinstance(o, torch.Tensor) else o.pooler_output for o in (img, txt))
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def test_pickscore_matches_logit_scale_times_cosine(hf_folder):
    from transformers import AutoTokenizer

    model, folder = hf_folder
    reward = get_reward("pickscore", model_dir=str(folder), device="cpu")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores, info = reward(images, PROMPTS)
    expected = model.logit_scale.exp() * _hf_direct(model, images, PROMPTS, AutoTokenizer.from_pretrained(folder))
    torch.testing.assert_close(scores, expected.detach(), atol=1e-4, rtol=1e-4)
    assert info["truncated"] == 1


def test_pickscore_scale_is_the_stored_one_in_bf16(hf_folder, tmp_path):
    """PickScore_v1's logit_scale 4.6052: exp = 100.00 in fp32, 98.86 from a bf16 copy (every score 1.1 % low)."""
    import safetensors.torch

    _, folder = hf_folder
    weights = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state["logit_scale"] = torch.tensor(4.6052)
    copy = tmp_path / "pick"
    shutil.copytree(folder, copy)
    safetensors.torch.save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    for dtype in ("float32", "bfloat16"):
        reward = get_reward("pickscore", model_dir=str(copy), device="cpu", dtype=dtype)
        assert reward.encoder.logit_scale == pytest.approx(100.0, abs=0.01)


def test_pickscore_crops_where_the_transformers_processor_does(hf_folder):
    """A 32 x 43 image at crop size 32: transformers' CLIP processor starts the crop at column (43 - 32) // 2 = 5,
    torchvision's rounding at 6 (it moved SDXL's 832 x 1216 images by a pixel)."""
    from transformers import CLIPImageProcessor

    _, folder = hf_folder
    encoder = get_reward("pickscore", model_dir=str(folder), device="cpu").encoder
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 43, 3), dtype=np.uint8))
    theirs = CLIPImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"]
    ours = preprocess_images([image], 32, encoder.mean, encoder.std, torch.device("cpu"), resize=encoder.resize)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # the same folder read by `clip` / `decomposed-clip` (as Denscore is) crops there too
    encoder = get_reward("clip", checkpoint=str(folder), device="cpu").encoder
    ours = preprocess_images([image], 32, encoder.mean, encoder.std, torch.device("cpu"), resize=encoder.resize)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pickscore_resizes_to_the_processors_shortest_edge_before_its_crop(hf_folder, tmp_path):
    """Only crop_size was read: a processor resizing to 40 and cropping 32 was resized to 32 (another image)."""
    import shutil

    from transformers import CLIPImageProcessor

    folder = shutil.copytree(hf_folder[1], tmp_path / "resize40")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "size": {"shortest_edge": 40}}))
    encoder = get_reward("pickscore", model_dir=str(folder), device="cpu").encoder
    smooth = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)  # PIL and torch resample alike
    image = Image.fromarray(smooth).resize((61, 48), Image.BICUBIC)
    theirs = CLIPImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"]
    ours, cropped_only = (preprocess_images([image], 32, encoder.mean, encoder.std, torch.device("cpu"), resize=r)
                          for r in (encoder.resize, partial(resize_center_crop, floor_offset=True)))
    assert (ours - theirs).abs().mean() < 0.02 < (cropped_only - theirs).abs().mean() / 5


def test_pickscore_without_tokenizer_files_is_refused_not_blind_to_the_prompt(hf_folder, tmp_path, monkeypatch):
    """transformers built a 2-token tokenizer from a folder holding only config.json and weights: every prompt
    became the same unknown tokens and PickScore scored the image alone."""
    import shutil

    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_folder[1] / name, folder / name)
    with pytest.raises(WeightsNotFoundError, match="the tokenizer has no vocabulary|no CLIP tokenizer in"):  # tf 5 | 4
        get_reward("pickscore", model_dir=str(folder), device="cpu")
    # the tokenizer and processor from another folder, named with "~" as a config or t2i-score gives it
    monkeypatch.setenv("HOME", str(hf_folder[1].parent))
    reward = get_reward("pickscore", model_dir=str(folder), processor_dir=f"~/{hf_folder[1].name}", device="cpu")
    tokens = reward.encoder.tokenizer
    assert tokens("a red cube")["input_ids"][1] != tokens("two cats")["input_ids"][1]



def test_a_processor_hub_name_is_read_as_its_cached_folder(hf_folder, tmp_path, monkeypatch):
    """A hub name in the cache gave transformers' tokenizer, but its preprocessor_config.json was never read (the
    preprocessing fell back to CLIP's defaults): here a crop of 24 px, which the defaults would not take."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--proc" / "snapshots" / ("a" * 40)
    shutil.copytree(hf_folder[1], snapshot, ignore=shutil.ignore_patterns("*.safetensors", "preprocessor_config*"))
    (snapshot / "preprocessor_config.json").write_text(json.dumps({"crop_size": 24, "size": {"shortest_edge": 24}}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = get_reward("pickscore", model_dir=str(hf_folder[1]), processor_dir="org/proc", device="cpu")
    assert reward.encoder.image_size == 24
    # found before the weights load (minutes for PickScore's), not after them
    import reward_models.pickscore as pickscore

    monkeypatch.setattr(pickscore, "load_state_dict_file", lambda folder: pytest.fail("loaded the weights first"))
    with pytest.raises(WeightsNotFoundError, match="processor_dir org/other is neither a folder nor a hub name in"):
        get_reward("pickscore", model_dir=str(hf_folder[1]), processor_dir="org/other", device="cpu")


def test_a_truncated_safetensors_file_is_a_one_line_error(hf_folder, tmp_path):
    from reward_models.base import CheckpointMismatchError, load_state_dict_file

    data = (hf_folder[1] / "model.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="half.safetensors is not a readable .safetensors file"):
        load_state_dict_file(tmp_path / "half.safetensors")


def test_malformed_config_and_index_files_are_one_line_errors_naming_them(hf_folder, tmp_path):
    """A config.json that is not JSON (PickScore: transformers' OSError; clip: a JSON error naming no file), an
    open_clip_config.json without model_cfg (KeyError), a shard index naming a file outside its folder (loaded)."""
    import shutil

    from reward_models.base import CheckpointMismatchError, load_state_dict_file

    broken = shutil.copytree(hf_folder[1], tmp_path / "broken")
    (broken / "config.json").write_text('{"vision_config": ')
    for name in ("pickscore", "clip"):
        key = "model_dir" if name == "pickscore" else "checkpoint"
        with pytest.raises(CheckpointMismatchError, match=f"{broken / 'config.json'} is not a readable JSON file"):
            get_reward(name, **{key: str(broken)}, device="cpu")
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(CheckpointMismatchError, match="open_clip_config.json holds no 'model_cfg'"):
        get_reward("clip", checkpoint=str(tmp_path / "oc"), device="cpu")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(hf_folder[1] / "model.safetensors", outside)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointMismatchError, match="names shard '../elsewhere.safetensors', which is not a"):
        load_state_dict_file(broken / "model.safetensors.index.json")
    # a hub cache's shards are links into its blobs/: read as named, not refused for where they resolve
    (broken / "linked.safetensors").symlink_to(outside)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "linked.safetensors"}}))
    assert set(load_state_dict_file(broken / "model.safetensors.index.json")) == set(
        load_state_dict_file(hf_folder[1] / "model.safetensors"))


def test_pickscore_gradients_and_missing_folder(hf_folder, tmp_path):
    _, folder = hf_folder
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    get_reward("pickscore", model_dir=str(folder), device="cpu")(images, PROMPTS[:2])[0].sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(WeightsNotFoundError, match="yuvalkirstain/PickScore_v1") as err:
        get_reward("pickscore", model_dir=str(tmp_path / "PickScore_v1"), device="cpu")
    assert str(tmp_path / "PickScore_v1") in str(err.value)


def test_pickscore_loads_a_checkpoint_with_the_position_ids_older_transformers_saved(hf_folder, tmp_path):
    """PickScore_v1 (early 2023) was saved by transformers < 4.31, with the position_ids buffers: the strict key
    check refused them as unexpected keys."""
    import shutil

    from safetensors.torch import load_file, save_file

    model, folder = hf_folder
    old = tmp_path / "PickScore_v1"
    shutil.copytree(folder, old)
    state = load_file(str(old / "model.safetensors"))
    for side, n in (("text", 77), ("vision", (32 // 8) ** 2 + 1)):
        state[f"{side}_model.embeddings.position_ids"] = torch.arange(n)[None]
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = get_reward("pickscore", model_dir=str(old), device="cpu")(images, PROMPTS[:2])[0]
    new = get_reward("pickscore", model_dir=str(folder), device="cpu")(images, PROMPTS[:2])[0]
    torch.testing.assert_close(ours, new)


def test_gradients_reach_a_list_of_tensors_and_not_under_the_callers_no_grad(hf_folder):
    _, folder = hf_folder
    reward = get_reward("pickscore", model_dir=str(folder), device="cpu")
    images = [torch.rand(3, 40, 40, requires_grad=True), torch.rand(3, 36, 44, requires_grad=True)]
    reward(images, PROMPTS[:2])[0].sum().backward()
    assert all(im.grad is not None and im.grad.abs().sum() > 0 for im in images)
    with torch.no_grad():
        assert not reward(images, PROMPTS[:2])[0].requires_grad


def test_half_precision_images_and_images_outside_0_1(hf_folder):
    _, folder = hf_folder
    reward = get_reward("pickscore", model_dir=str(folder), device="cpu")
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reward(images.half(), PROMPTS[:2])[0], reward(images.half().float(), PROMPTS[:2])[0])
    with pytest.warns(UserWarning, match=r"read as RGB in \[0, 1\], but these span \[-1"):
        reward(images * 2 - 1.5, PROMPTS[:2])


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_hf_to_open_clip_conversion_gives_the_same_embeddings(act):
    import open_clip

    hf = tiny_hf_clip(act)
    oc = open_clip.model.CLIP(**hf_config_to_open_clip(hf.config.to_dict())).eval()
    load_checked(oc, hf_clip_to_open_clip(hf.state_dict()), "converted")
    images = torch.randn(2, 3, 32, 32)
    ids = open_clip.tokenize(["a red circle", "two blue squares on a green background"], context_length=77)
    with torch.no_grad():
        hf_img, hf_txt = hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=ids)
        hf_img, hf_txt = (o if isinstance(o, torch.Tensor) else o.pooler_output for o in (hf_img, hf_txt))
        torch.testing.assert_close(oc.encode_image(images), hf_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(oc.encode_text(ids), hf_txt, atol=1e-5, rtol=1e-5)
    back = open_clip_to_hf_clip(oc.state_dict())  # and back: the exact original tensors
    own = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(back) == sorted(own) and all(torch.equal(back[k], own[k]) for k in own)


def test_clip_reward_loads_a_transformers_folder_through_the_converter(hf_folder):
    model, folder = hf_folder
    from transformers import AutoTokenizer

    images = torch.rand(2, 3, 32, 32)
    scores, _ = get_reward("decomposed-clip", checkpoint=str(folder), omega=1.0, device="cpu")(images, PROMPTS[:2])
    expected = _hf_direct(model, images, PROMPTS[:2], AutoTokenizer.from_pretrained(folder))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_a_sparse_hf_config_gets_the_transformers_defaults(tmp_path):
    """transformers may save only what differs from its defaults; missing keys were a bare KeyError. Here the
    defaults: image 224, vocab 49408, context 77, quick_gelu; mlp_ratio 64 / 32 = 2, head width 32 / 4 = 8."""
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    sparse = {"projection_dim": 16, "text_config": dict(common), "vision_config": dict(common, patch_size=8)}
    assert hf_config_to_open_clip(sparse) == {
        "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "patch_size": 8, "width": 32, "layers": 2, "mlp_ratio": 2.0, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0}}
    assert hf_preprocess_cfg(tmp_path, sparse)["size"] == 224  # no preprocessor_config.json: the model's size


@pytest.mark.parametrize("pre, expected", [({"resample": 2}, "bilinear"), ({"resample": 0}, "nearest"),
                                           ({}, "bicubic"), ({"resample": 1}, "resample 1"),
                                           ({"do_center_crop": False}, "do_center_crop"),
                                           ({"do_resize": False}, "do_resize"),
                                           ({"do_normalize": False}, "do_normalize"),
                                           ({"do_rescale": False}, "do_rescale"),
                                           ({"rescale_factor": 1.0}, "rescale_factor 1.0"),
                                           ({"rescale_factor": 1 / 255}, "bicubic")])
def test_a_processor_is_followed_or_refused_never_ignored(tmp_path, pre, expected):
    """resample 1 (Lanczos) was scored bicubic, do_resize / do_center_crop / do_rescale / do_normalize false and
    another rescale_factor ignored: scores quietly unlike transformers'. Each is now followed or refused naming the
    file."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    config = {"projection_dim": 16, "text_config": {}, "vision_config": {}}
    if expected in ("bilinear", "nearest", "bicubic"):
        assert hf_preprocess_cfg(tmp_path, config)["interpolation"] == expected
    else:
        with pytest.raises(RewardSetupError, match=f"preprocessor_config.json: .*{expected}"):
            hf_preprocess_cfg(tmp_path, config)


def test_pickscore_and_clip_load_a_folder_whose_config_json_omits_the_defaults(tmp_path):
    from t2i_align.toy.tokenizer import build_clip_tokenizer

    tiny_hf_clip("quick_gelu", image_size=224, patch_size=32).save_pretrained(str(tmp_path), safe_serialization=True)
    build_clip_tokenizer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for tower, keys in (("text_config", ("vocab_size", "max_position_embeddings", "hidden_act")),
                        ("vision_config", ("image_size", "patch_size", "hidden_act"))):
        for key in keys:
            config[tower].pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    pick = get_reward("pickscore", model_dir=str(tmp_path), device="cpu")(images, PROMPTS[:2])[1]["cosine"]
    clip = get_reward("clip", arch=None, checkpoint=str(tmp_path), device="cpu")(images, PROMPTS[:2])[1]["cosine"]
    torch.testing.assert_close(torch.tensor(pick), torch.tensor(clip), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    model = tiny_open_clip()
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the official layout: {"state_dict": open_clip keys}
    return model, path


def test_hpsv2_is_the_raw_cosine(hps_ckpt):
    import open_clip

    model, path = hps_ckpt
    reward = get_reward("hpsv2", checkpoint=str(path), arch=TINY, device="cpu")
    images = torch.rand(3, 3, 32, 32)
    scores, info = reward(images, PROMPTS)
    with torch.no_grad():
        expected = (model.encode_image((images - MEAN) / STD, normalize=True)
                    * model.encode_text(open_clip.tokenize(PROMPTS, 16), normalize=True)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert info["truncated"] == 1 and reward.differentiable


def test_hpsv2_errors(hps_ckpt, tmp_path):
    _, path = hps_ckpt
    with pytest.raises(WeightsNotFoundError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        get_reward("hpsv2", arch=TINY, device="cpu")
    with pytest.raises(WeightsNotFoundError, match=r"HPS_v2_compressed\.pt"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "x.pt"), arch=TINY, version="v2.0", device="cpu")
    wrong = json.loads(json.dumps(TINY))
    wrong["embed_dim"] = 24
    with pytest.raises(CheckpointMismatchError, match="text_projection"):
        get_reward("hpsv2", checkpoint=str(path), arch=wrong, device="cpu")
    # an open_clip tag holds plain CLIP-H, which was fetched (online) and scored under the name hpsv2
    with pytest.raises(WeightsNotFoundError, match="laion2b_s32b_b79k does not exist.*HPS_v2.1_compressed"):
        get_reward("hpsv2", checkpoint="laion2b_s32b_b79k", device="cpu")
    # so was a folder of other CLIP weights (PickScore's transformers folder, an open_clip folder): HPSv2 is one file
    from reward_models.base import RewardSetupError

    (tmp_path / "pickscore").mkdir()
    (tmp_path / "pickscore" / "config.json").write_text("{}")
    with pytest.raises(RewardSetupError, match="is a folder, but HPSv2's weights ship as one file"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "pickscore"), arch=TINY, device="cpu")


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory, hps_ckpt):
    model, clip_path = hps_ckpt
    torch.manual_seed(3)
    head = AestheticHead(16).eval()
    path = tmp_path_factory.mktemp("aes") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return model, clip_path, head, path


def test_aesthetic_is_the_mlp_on_normalised_features(aesthetic_files):
    model, clip_path, head, path = aesthetic_files
    reward = get_reward("aesthetic", head=str(path), checkpoint=str(clip_path), arch=TINY, device="cpu")
    images = torch.rand(2, 3, 32, 32)
    scores, _ = reward(images, ["", "ignored"])
    with torch.no_grad():
        expected = head(model.encode_image((images - MEAN) / STD, normalize=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    grad_images = torch.rand(2, 3, 48, 64, requires_grad=True)
    reward(grad_images, ["", ""])[0].sum().backward()
    assert grad_images.grad.abs().sum() > 0


def test_aesthetic_linear_head(aesthetic_files, tmp_path):
    model, clip_path, _, _ = aesthetic_files
    linear = torch.nn.Linear(model.visual.output_dim, 1)
    path = tmp_path / "sa_0_4_linear.pth"
    torch.save(linear.state_dict(), path)
    reward = get_reward("aesthetic", head=str(path), checkpoint=str(clip_path), arch=TINY, device="cpu")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = linear(model.encode_image((images - MEAN) / STD, normalize=True)).squeeze(-1)
    torch.testing.assert_close(reward(images, ["", ""])[0], expected, atol=1e-5, rtol=1e-4)


def test_aesthetic_errors(aesthetic_files, tmp_path):
    _, clip_path, _, _ = aesthetic_files
    with pytest.raises(WeightsNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        get_reward("aesthetic", checkpoint=str(clip_path), arch=TINY, device="cpu")
    wide = tmp_path / "head768.pth"
    torch.save(AestheticHead(768).state_dict(), wide)
    with pytest.raises(ValueError, match="expects 768-d"):
        get_reward("aesthetic", head=str(wide), checkpoint=str(clip_path), arch=TINY, device="cpu")
    odd = tmp_path / "odd.pth"
    torch.save({"fc.weight": torch.zeros(2, 3)}, odd)
    with pytest.raises(ValueError, match="not an aesthetic head"):
        get_reward("aesthetic", head=str(odd), checkpoint=str(clip_path), arch=TINY, device="cpu")


def test_aesthetic_on_a_transformers_folder_crops_as_torchvision(hf_folder, tmp_path):
    """The official predictor preprocesses with OpenAI CLIP's torchvision CenterCrop, whose offset rounds; a
    transformers folder's processor (followed for PickScore) starts it at (n - size) // 2, one pixel off at
    35 = 32 + 3 wide."""
    from torchvision.transforms.functional import center_crop

    model, folder = hf_folder
    torch.manual_seed(4)
    head = AestheticHead(16).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    reward = get_reward("aesthetic", head=str(tmp_path / "head.pth"), checkpoint=str(folder), device="cpu")
    images = torch.rand(2, 3, 32, 35)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=(center_crop(images, [32, 32]) - MEAN) / STD)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        expected = head(F.normalize(feats, dim=-1)).squeeze(-1)
    torch.testing.assert_close(reward(images, ["", ""])[0], expected, atol=1e-5, rtol=1e-4)
