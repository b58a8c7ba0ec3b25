"""HPSv2's own preprocessing: the longest side to the model size, zero padding (before normalisation), no crop.

Issue 10, bug 9: HPSv2 used CLIP's shortest-side resize + centre crop, which on non-square images scored a
different picture (the crop cut the sides off) than the official scorer (hpsv2 1.2.0, ResizeMaxSize).
"""
import pytest
import torch

from reward_models import get_reward
from reward_models.base import preprocess_images
from reward_models.clip import OPENAI_MEAN, OPENAI_STD
from reward_models.hpsv2 import resize_longest_pad

MEAN, STD = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
COLOUR = torch.tensor([0.2, 0.5, 0.8]).view(3, 1, 1)
"""A constant image: any resize that preserves constants (bicubic weights sum to 1) keeps it exactly."""


def _flat(h, w):
    return COLOUR.expand(3, h, w)[None].clone()


def _normalised(h, w):
    return preprocess_images(_flat(h, w), 4, OPENAI_MEAN, OPENAI_STD, torch.device("cpu"),
                             resize=resize_longest_pad)[0]


def test_wide_image_is_padded_top_and_bottom_with_top_getting_the_smaller_half():
    # 2 x 8 (H x W) -> scale 4/8 -> 1 x 4, pad_h = 3: top 3 // 2 = 1 row, bottom 2 rows.
    out = resize_longest_pad(_flat(2, 8), 4)[0]
    assert out.shape == (3, 4, 4)
    content = [bool((out[:, r] != 0).all()) for r in range(4)]
    assert content == [False, True, False, False]
    torch.testing.assert_close(out[:, 1], COLOUR.view(3, 1).expand(3, 4))
    assert torch.equal(out[:, [0, 2, 3]], torch.zeros(3, 3, 4))


def test_tall_image_is_padded_left_and_right():
    # 8 x 2 -> 4 x 1, pad_w = 3: left 1 column, right 2.
    out = resize_longest_pad(_flat(8, 2), 4)[0]
    assert [bool((out[:, :, c] != 0).all()) for c in range(4)] == [False, True, False, False]


@pytest.mark.parametrize("h, w, rows, cols", [(4, 8, slice(1, 3), slice(0, 4)), (8, 4, slice(0, 4), slice(1, 3))])
def test_8x4_and_4x8_padding_is_zero_before_normalisation(h, w, rows, cols):
    # 4 x 8 -> 2 x 4 with one pad row above and below; 8 x 4 -> 4 x 2 with one pad column left and right.
    out = _normalised(h, w)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[rows, cols] = True
    content = ((COLOUR - MEAN) / STD).view(3)          # e.g. red (0.2 - 0.48145466) / 0.26862954 = -1.04778
    padding = ((0.0 - MEAN) / STD).view(3)             # red -0.48145466 / 0.26862954 = -1.79226
    assert content[0].item() == pytest.approx(-1.04778, abs=1e-4)
    assert padding[0].item() == pytest.approx(-1.79226, abs=1e-4)
    expected = torch.where(mask, content.view(3, 1, 1), padding.view(3, 1, 1))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("h, w", [(384, 640), (640, 384)])
def test_640x384_keeps_the_whole_image_and_pads_45_pixels_each_side(h, w):
    # scale 224/640 = 0.35: 384 -> round(134.4) = 134, pad 90 = 45 + 45.
    out = resize_longest_pad(torch.full((1, 3, h, w), 0.75), 224)[0]
    assert out.shape == (3, 224, 224)
    line = out[0, :, 100] if h < w else out[0, 100, :]  # across the padded direction
    assert torch.equal(line[:45], torch.zeros(45)) and torch.equal(line[179:], torch.zeros(45))
    torch.testing.assert_close(line[45:179], torch.full((134,), 0.75))


def test_matches_the_official_torchvision_pipeline_on_a_random_non_square_image():
    """ToTensor -> torchvision resize (bicubic, longest side) -> pad(fill=0) -> Normalize, the official order."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8))
    x = TF.to_tensor(image)
    x = TF.resize(x, [round(30 * 16 / 52), 16], TF.InterpolationMode.BICUBIC, antialias=True)  # 9 x 16
    x = TF.pad(x, [0, 3, 0, 4], fill=0)                                                       # pad 7: 3 + 4
    expected = TF.normalize(x, OPENAI_MEAN, OPENAI_STD)
    ours = preprocess_images([image], 16, OPENAI_MEAN, OPENAI_STD, torch.device("cpu"), resize=resize_longest_pad)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-5)


def test_hpsv2_reward_scores_the_padded_image_not_a_centre_crop(tmp_path):
    from test_rewards_pickscore_hps_aesthetic import TINY, tiny_open_clip

    model = tiny_open_clip()
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    reward = get_reward("hpsv2", checkpoint=str(path), arch=TINY, device="cpu")
    torch.manual_seed(0)
    wide = torch.rand(1, 3, 16, 64)  # 16 x 64 -> 8 x 32, 12 pad rows above and below
    scores, _ = reward(wide, ["a red circle"])
    import open_clip
    import torch.nn.functional as F

    padded = F.pad(F.interpolate(wide, size=(8, 32), mode="bicubic", antialias=True, align_corners=False),
                   (0, 0, 12, 12))
    with torch.no_grad():
        expected = (model.encode_image((padded - MEAN) / STD, normalize=True)
                    * model.encode_text(open_clip.tokenize(["a red circle"], 16), normalize=True)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("h, w", [(1, 500), (500, 1)])
def test_a_banner_over_448_to_1_keeps_one_line_of_pixels(h, w):
    # 1 x 500 at 224: the short side round(224 / 500) = round(0.448) = 0 crashed the resize; max(1, 0) = 1 line,
    # at (224 - 1) // 2 = 111, the rest padding.
    out = resize_longest_pad(_flat(h, w), 224)[0]
    line = out[:, 111] if h == 1 else out[:, :, 111]
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(line, COLOUR.view(3, 1).expand(3, 224))
    assert out.abs().sum(0).count_nonzero() == 224
