"""clip / toy-clip rewards and the shared base helpers, on tiny random open_clip models (no downloads)."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward_models import available_rewards, get_reward
from reward_models.base import CheckpointMismatchError, WeightsNotFoundError, preprocess_images, to_image_tensors
from reward_models.clip import OPENAI_MEAN, OPENAI_STD

TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["a red circle", "", "word " * 40]


def tiny_clip(cfg=TINY, seed=0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**cfg).eval()


def test_the_normalisation_constants_are_openais():
    """Pinned, as the direct computations below take them from our module: a typo there would pass them."""
    import open_clip

    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073) == open_clip.OPENAI_DATASET_MEAN
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711) == open_clip.OPENAI_DATASET_STD


def direct_cosine(model, pixels01, prompts, context_length):
    """The reference computation, straight from open_clip: no code of ours but the normalisation constants."""
    import open_clip

    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((pixels01 - mean) / std, normalize=True)
        txt = model.encode_text(open_clip.tokenize(prompts, context_length=context_length), normalize=True)
    return (img * txt).sum(-1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from safetensors.torch import save_file

    model = tiny_clip()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_registry_lists_every_reward():
    names = set(available_rewards())
    assert {"clip", "toy-clip", "decomposed-clip", "pickscore", "hpsv2", "aesthetic", "toy-judge"} <= names


def test_clip_score_matches_direct_computation_and_counts_truncation(tiny_ckpt):
    model, path = tiny_ckpt
    reward = get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores, info = reward(images, PROMPTS)
    expected = 100 * direct_cosine(model, images, PROMPTS, 16)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert info["truncated"] == 1 and len(info["cosine"]) == 3
    assert not scores.requires_grad


def test_skipped_random_init_comes_back_after_the_block():
    """The loaders build models inside `without_random_init` (their weights are all loaded after; the test above
    checks the scores); torch's own initialisers must work again afterwards, also after an error."""
    from reward_models.base import without_random_init

    torch.manual_seed(0)
    before = torch.nn.Linear(8, 8).weight.detach().clone()
    initialiser = torch.nn.init.kaiming_uniform_  # what nn.Linear draws its weights with
    with pytest.raises(RuntimeError, match="inside"):
        with without_random_init():
            assert torch.nn.init.kaiming_uniform_ is not initialiser  # skipped in the block
            torch.nn.Linear(8, 8)
            raise RuntimeError("inside")
    assert torch.nn.init.kaiming_uniform_ is initialiser
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(8, 8).weight, before) and before.abs().sum() > 0


def test_pt_checkpoint_with_state_dict_wrapper_and_module_prefix(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    images = torch.rand(2, 3, 32, 32)
    scores, _ = get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")(images, PROMPTS[:2])
    torch.testing.assert_close(scores, 100 * direct_cosine(model, images, PROMPTS[:2], 16), atol=1e-4, rtol=1e-4)


def test_pickled_objects_are_refused_with_a_clear_message(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointMismatchError, match="weights_only=True") as err:
        get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")
    # the reason, not torch's advice to load it with weights_only=False, nor its terminal colour codes
    assert "(a pickle that weights_only loading refuses (Unsupported global" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "\x1b" not in str(err.value)


def test_missing_weights_name_the_file_and_its_source(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError) as err:
        get_reward("clip", arch=TINY, checkpoint=str(missing), device="cpu")
    assert str(missing) in str(err.value) and "huggingface.co" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="no checkpoint was given"):
        get_reward("clip", arch=TINY, device="cpu")


def test_wrong_architecture_lists_the_key_mismatch(tiny_ckpt):
    _, path = tiny_ckpt
    deeper = json.loads(json.dumps(TINY))
    deeper["text_cfg"]["layers"] = 3
    deeper["vision_cfg"]["width"] = 48
    with pytest.raises(CheckpointMismatchError) as err:
        get_reward("clip", arch=deeper, checkpoint=str(path), device="cpu")
    msg = str(err.value)
    assert "missing keys" in msg and "transformer.resblocks.2" in msg
    assert "shape mismatches" in msg and "visual.class_embedding" in msg


def test_images_of_any_mode_and_size(tiny_ckpt):
    _, path = tiny_ckpt
    reward = get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    images = [rgb, rgb.convert("L").resize((7, 50)), rgb.convert("RGBA").resize((90, 60)), rgb.convert("P"),
              rgb.convert("CMYK"), rgb.convert("1"), Image.fromarray(rng.integers(0, 4000, (20, 30)).astype(np.uint16)),
              rng.integers(0, 256, (40, 33, 3), dtype=np.uint8), torch.rand(4, 17, 64)]
    scores, _ = reward(images, ["a shape"] * len(images))
    assert scores.shape == (len(images),) and torch.isfinite(scores).all()
    as_tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # uint8 tensor == same PIL image
    torch.testing.assert_close(reward(as_tensor, ["a shape"])[0], scores[:1])
    with pytest.raises(ValueError, match=r"channels-first .* got shape \(1, 32, 32, 3\)"):
        reward(torch.rand(1, 32, 32, 3), ["x"])
    # the conversion's values (`grey_to_8bit`, as ImageReward's and training's): 16-bit by its range, a dark one
    # too (200 / 257 -> 0, it read 200 / 255), float "F" in [0, 1] to 8 bits (127), 8-bit grey 51 / 255 = 0.2
    white16, dark16, half, grey, f16 = to_image_tensors([Image.fromarray(np.full((5, 7), 65535, np.uint16)),
                                                         Image.new("I;16", (4, 3), 200), Image.new("F", (4, 3), 0.5),
                                                         Image.new("L", (4, 3), 51), Image.new("F", (2, 2), 30000.0)])
    assert bool((f16 == 116 / 255).all())  # F beyond 8 bits: 16-bit values (30000 / 257 = 116.7), not clipped
    assert white16.shape == (3, 5, 7) and bool((white16 == 1.0).all()) and bool((dark16 == 0).all())
    assert half.shape == (3, 3, 4) and bool((half == 127 / 255).all())
    torch.testing.assert_close(grey, torch.full((3, 3, 4), 0.2))
    # numpy: uint16 by 65535, other integers as 8-bit values; a CHW array is told the layout it needs
    for arr, value in ((np.full((2, 3, 3), 40000, np.uint16), 40000 / 65535), (np.full((2, 3, 3), 51, np.int64), 0.2)):
        torch.testing.assert_close(to_image_tensors([arr])[0], torch.full((3, 2, 3), value))
    with pytest.raises(ValueError, match=r"channels-last HxW or HxWxC .* got shape \(3, 64, 64\)"):
        to_image_tensors([np.zeros((3, 64, 64))])
    rgba = torch.rand(4, 5, 6)
    assert torch.equal(to_image_tensors([rgba])[0], rgba[:3])  # alpha dropped
    # a [1, C, H, W] element is one image (a 5-d batch reached the model); a batch in one element is refused
    assert torch.equal(to_image_tensors([rgba[None]])[0], rgba[:3])
    with pytest.raises(ValueError, match=r"one image per element; one holds 2 \(shape \(2, 4, 5, 6\)\)"):
        to_image_tensors([rgba, torch.stack([rgba, rgba])])
    arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    from_numpy, from_pil = to_image_tensors([arr, Image.fromarray(arr)])
    assert from_numpy.shape == (3, 6, 5) and torch.equal(from_numpy, from_pil)


def test_tensor_preprocessing_matches_open_clip_transform():
    import open_clip

    # noise, shrunk ~3x: a smooth image let bilinear (0.0085 off) and no antialiasing (0.0055) pass; here ours is
    # 0.004 off on average (0.014 at most), bilinear 0.054 (0.22), no antialiasing 0.66 (2.2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    official = open_clip.image_transform(32, is_train=False)(image)[None]
    ours = preprocess_images([image], 32, OPENAI_MEAN, OPENAI_STD, torch.device("cpu"))
    assert ours.shape == official.shape
    assert (ours - official).abs().mean() < 0.01 and (ours - official).abs().max() < 0.05


def test_bad_inputs_and_empty_batch(tiny_ckpt):
    _, path = tiny_ckpt
    reward = get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 32, 32), ["x"])
    with pytest.raises(TypeError, match="strings"):
        reward(torch.rand(1, 3, 32, 32), [3])
    # one image and a prompt as a str: "has no len()", or a 3-letter prompt scored one letter per image
    for images, prompts in ((Image.new("RGB", (32, 32)), ["x"]), (torch.rand(3, 3, 32, 32), "abc")):
        with pytest.raises(TypeError, match="takes a list of images and a list of prompts"):
            reward(images, prompts)
    with pytest.raises(ValueError, match=r"image 1 is an empty image \(size \(0, 0\)\)"):  # a ZeroDivisionError
        reward([Image.new("RGB", (8, 8)), Image.new("RGB", (0, 0))], ["x", "y"])
    scores, _ = reward(torch.rand(0, 3, 32, 32), [])
    assert scores.shape == (0,)


def test_clip_is_differentiable_through_resize(tiny_ckpt):
    _, path = tiny_ckpt
    reward = get_reward("clip", arch=TINY, checkpoint=str(path), device="cpu")
    assert reward.differentiable
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    scores, _ = reward(images, PROMPTS[:2])
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def _toy_clip_folder(tmp_path):
    """The shipped toy CLIP when it has been built, else the same architecture with random weights, written in
    the same layout (open_clip_config.json + open_clip_model.safetensors, as t2i_align/toy/build.py does)."""
    from safetensors.torch import save_file

    from t2i_align.toy.architectures import toy_clip_config
    from t2i_align.toy.assets import clip_dir

    if (clip_dir() / "open_clip_config.json").is_file():
        return clip_dir(), None
    cfg = toy_clip_config()
    model = tiny_clip(cfg)
    folder = tmp_path / "toy_clip"
    folder.mkdir()
    meta = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, folder


def test_toy_clip_matches_open_clip_local_dir_loader(tmp_path):
    import open_clip

    folder, override = _toy_clip_folder(tmp_path)
    reward = get_reward("toy-clip", checkpoint=override, device="cpu")
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(folder))
    ctx = model.context_length
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = ["a small red circle in the top left on a black background", "", "word " * 80]
    scores, info = reward(images, prompts)
    torch.testing.assert_close(scores, 100 * direct_cosine(model.eval(), images, prompts, ctx), atol=1e-4, rtol=1e-4)
    assert info["truncated"] == 1


def test_toy_clip_missing_assets_say_how_to_build(tmp_path, monkeypatch):
    from t2i_align.toy import assets

    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "absent")
    with pytest.raises(WeightsNotFoundError, match="python -m t2i_align.toy build"):
        get_reward("toy-clip", device="cpu")


def _computes_on(device: str) -> bool:
    try:
        return torch.empty(1, device=device).numel() == 1
    except (RuntimeError, AssertionError):
        return False


def test_a_device_or_dtype_that_cannot_be_used_is_a_setup_error():
    """Told when the reward is built, not at the first tensor moved to a GPU this machine lacks."""
    from reward_models.base import RewardSetupError, resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RewardSetupError, match="'gpu' is not a device: use cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(RewardSetupError, match=f"this machine has {torch.cuda.device_count()} CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    # mps on a machine without it failed after the weights loaded (a RuntimeError traceback); meta holds no values
    unusable = ["meta"] + [name for name in ("mps", "xla") if not _computes_on(name)]
    for name in unusable:
        with pytest.raises(RewardSetupError, match=f"cannot compute on {name}; use cpu"):
            resolve_device(name)
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(None) == torch.float32
    with pytest.raises(RewardSetupError, match="unknown dtype 'int8'; use fp32, fp16 or bf16"):
        resolve_dtype("int8")


def test_an_arch_dict_naming_a_local_hf_tokenizer_uses_it(tiny_ckpt, tmp_path):
    """`hf_tokenizer_name` in an arch dict fell back to CLIP's BPE silently; a hub name is refused (no downloads)."""
    from transformers import BertTokenizer

    from reward_models.base import RewardSetupError

    _, path = tiny_ckpt
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red"]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    arch = {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_tokenizer_name": str(tmp_path / "bert")}}
    reward = get_reward("clip", arch=arch, checkpoint=str(path), device="cpu")
    ids = reward.encoder.tokenizer(["a red circle"], context_length=16)[0]
    assert ids[:5].tolist() == [2, 5, 6, 1, 3]  # [CLS] a red [UNK] [SEP]: the folder's BERT vocab, not CLIP's BPE
    assert reward.encoder.token_counts(["a red circle", "word " * 20]) == [5, 22]
    assert torch.isfinite(reward(torch.rand(2, 3, 32, 32), ["a red", "word " * 20])[0]).all()
    hub = {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}}
    with pytest.raises(RewardSetupError, match=r"'timm/ViT-B-16-SigLIP'.*not a local folder.*--local-dir"):
        get_reward("clip", arch=hub, checkpoint=str(path), device="cpu")


def test_a_named_arch_with_a_local_weights_file_does_not_fetch_its_hub_tokenizer(tiny_ckpt):
    """A local file with arch="ViT-B-16-SigLIP" asked open_clip for its tokenizer, which downloads
    timm/ViT-B-16-SigLIP: offline a traceback, online a fetch. Now the same clear error as an arch dict's hub name."""
    from reward_models.base import RewardSetupError
    from reward_models.clip import _read_local, _tokenizer_for

    _, path = tiny_ckpt
    cfg, _, _, name = _read_local("ViT-B-16-SigLIP", path, "clip", "a file")
    assert name is None and cfg["text_cfg"]["hf_tokenizer_name"] == "timm/ViT-B-16-SigLIP"
    with pytest.raises(RewardSetupError, match=r"'timm/ViT-B-16-SigLIP'.*not a local folder.*get_model_config"):
        _tokenizer_for(name, cfg)


def _open_clip_folder(tmp_path, model, preprocess_cfg):
    from safetensors.torch import save_file

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    return tmp_path


def test_resize_mode_squash_is_followed_and_longest_refused(tiny_ckpt, tmp_path):
    """SigLIP's resize_mode "squash" (the whole image to size x size) was read as a shortest-side centre crop."""
    import torch.nn.functional as F

    from reward_models.base import RewardSetupError

    model, _ = tiny_ckpt
    folder = _open_clip_folder(tmp_path / "squash", model, {"resize_mode": "squash"})
    reward = get_reward("clip", arch=None, checkpoint=str(folder), device="cpu")
    images = torch.rand(2, 3, 32, 80, generator=torch.Generator().manual_seed(4))
    squashed = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(reward(images, PROMPTS[:2])[0], 100 * direct_cosine(model, squashed, PROMPTS[:2], 16),
                               atol=1e-4, rtol=1e-4)
    folder = _open_clip_folder(tmp_path / "longest", model, {"resize_mode": "longest"})
    with pytest.raises(RewardSetupError, match="resize_mode 'longest'.*shortest.*squash"):
        get_reward("clip", arch=None, checkpoint=str(folder), device="cpu")


def test_an_arch_given_with_a_folder_is_reported_unused(tiny_ckpt, tmp_path):
    """A folder names its own architecture: clip.arch beside it was ignored without a word (the default arch, now
    None, could not be told from one the user gave). The folder's own is still what loads."""
    import warnings

    model, _ = tiny_ckpt
    folder = _open_clip_folder(tmp_path / "clip", model, {})
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none without arch
        plain = get_reward("clip", checkpoint=str(folder), device="cpu")(images, PROMPTS[:2])[0]
    with pytest.warns(UserWarning, match=r"arch=ViT-B-32 is not used: the folder .*clip names its own"):
        named = get_reward("clip", arch="ViT-B-32", checkpoint=str(folder), device="cpu")
    torch.testing.assert_close(named(images, PROMPTS[:2])[0], plain)
    from reward_models.aesthetic import AestheticHead

    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    with pytest.warns(UserWarning, match="arch=a config dict is not used"):
        get_reward("aesthetic", arch=TINY, checkpoint=str(folder), head=str(tmp_path / "head.pth"), device="cpu")


def test_a_failed_tag_download_is_one_error_not_a_logged_line_too(monkeypatch, caplog):
    """Offline, `checkpoint=openai` printed open_clip's `ERROR:root:Failed to download ...` and then our error with
    the same text; now only the error, and logging works as before afterwards."""
    import logging

    import open_clip

    from reward_models.base import WeightsNotFoundError

    def offline(arch, pretrained=None):
        logging.error("Failed to download weights for tag %r", pretrained)
        raise RuntimeError(f"Failed to download weights for tag {pretrained!r}")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with caplog.at_level(logging.INFO):
        with pytest.raises(WeightsNotFoundError, match="could not fetch 'openai'.*Failed to download"):
            get_reward("clip", arch="ViT-B-32", checkpoint="openai", device="cpu")
        assert not caplog.records
        logging.error("later")
    assert [r.getMessage() for r in caplog.records] == ["later"]
