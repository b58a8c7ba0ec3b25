"""The toy world's scenes, captions, judge and tokenizer (no trained weights needed)."""
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_align.gallery import to_uint8
from t2i_align.toy.judge import judge_batch, judge_image, read_attributes
from t2i_align.toy.scenes import (ATTRIBUTES, VALUES, Scene, all_scenes, long_caption, noisy_scene, render,
                                  scene_from_caption, short_caption, split_scenes)
from t2i_align.toy.tokenizer import build_clip_tokenizer

CHANCE = {a: 1 / len(VALUES[a]) for a in ATTRIBUTES}


def _rendered(n, seed=0):
    rng = random.Random(seed)
    scenes = [rng.choice(all_scenes()) for _ in range(n)]
    return scenes, [render(s, rng) for s in scenes]


def _accuracy(images, scenes):
    verdicts = judge_batch(images, scenes)
    return {a: np.mean([v.correct[a] for v in verdicts]) for a in ATTRIBUTES}


def _jpeg(image, quality):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_judge_is_right_on_ground_truth_images():
    scenes, images = _rendered(600)
    for attr, acc in _accuracy(images, scenes).items():
        assert acc >= 0.98, (attr, acc)


def test_judge_is_right_on_jpeg_ground_truth_as_in_exported_pairs():
    scenes, images = _rendered(600, seed=1)
    for attr, acc in _accuracy([_jpeg(im, 95) for im in images], scenes).items():
        assert acc >= 0.98, (attr, acc)


def test_judge_is_near_chance_on_noise():
    scenes, _ = _rendered(800, seed=2)
    rs = np.random.RandomState(0)
    noise = [rs.randint(0, 256, (32, 32, 3), dtype=np.uint8) for _ in scenes]
    for attr, acc in _accuracy(noise, scenes).items():
        assert abs(acc - CHANCE[attr]) < 0.07, (attr, acc, CHANCE[attr])


def test_judge_reads_each_attribute_of_a_known_scene_and_scores_mismatches():
    scene = Scene("blue", "triangle", "large", "bottom left", "white")
    image = render(scene)
    assert read_attributes(image) == scene.as_dict()
    asked = Scene("red", "triangle", "small", "bottom left", "white")
    verdict = judge_image(image, asked)
    assert verdict.correct == {"color": False, "shape": True, "size": False, "position": True,
                               "background": True}
    assert verdict.score == pytest.approx(3 / 5)


def test_judge_on_a_blank_image_gets_only_the_background():
    scene = Scene("red", "circle", "small", "top left", "gray")
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert judge_image(blank, scene).correct == {"color": False, "shape": False, "size": False,
                                                 "position": False, "background": True}


def test_judge_accepts_larger_images_and_float_tensors():
    rng = random.Random(4)
    scenes = [rng.choice(all_scenes()) for _ in range(200)]
    big = [render(s, rng, size=64) for s in scenes]  # judged after a box downsample to 32 px
    assert np.mean([judge_image(im, s).score for im, s in zip(big, scenes)]) >= 0.97
    scene = Scene("yellow", "square", "large", "top right", "black")
    as_float = render(scene).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    assert judge_image(to_uint8(as_float)[0], scene).score == 1.0


def test_split_is_fixed_and_disjoint():
    train, heldout = split_scenes()
    assert len(heldout) == 60 and len(train) == 300
    assert not set(train) & set(heldout)
    assert split_scenes() == (train, heldout)


def test_captions_short_and_long(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "tok")
    scene = Scene("purple", "circle", "small", "top right", "gray")
    short = short_caption(scene)
    assert short.count(".") == 0 and all(v in short for v in scene.as_dict().values())
    long = long_caption(scene, random.Random(3))
    assert long.count(". ") + 1 >= 4
    ids = tok(long).input_ids
    assert len(ids) > tok.model_max_length == 77
    # The background is only named past the 77-token context: a truncating encoder never sees it.
    kept = tok.decode(tok(long, truncation=True, max_length=77).input_ids, skip_special_tokens=True)
    assert "gray" not in kept and "gray" in long
    from t2i_align.toy.scenes import scene_from_caption

    # read back with the whitespace a prompt file or a pasted prompt brings (the short form took it; the long did not)
    assert scene_from_caption(f"\n {long} ") == scene_from_caption(f" {short}\n") == scene


def test_tokenizer_gives_real_clip_ids(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "tok")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407


def test_noisy_scene_keeps_colour_and_changes_the_rest_at_the_given_rate():
    rng = random.Random(0)
    scene = Scene("green", "square", "large", "top left", "black")
    noisy = [noisy_scene(scene, rng, 0.6) for _ in range(3000)]
    assert all(n.color == "green" for n in noisy)
    # P(changed) = 0.6 * (1 - 1/|values|): shape 0.4, size 0.3
    assert np.mean([n.shape != scene.shape for n in noisy]) == pytest.approx(0.4, abs=0.03)
    assert np.mean([n.size != scene.size for n in noisy]) == pytest.approx(0.3, abs=0.03)


def test_short_captions_parse_back_to_their_scene():
    assert all(scene_from_caption(short_caption(s)) == s for s in all_scenes())
    with pytest.raises(ValueError, match="not a toy short caption"):
        scene_from_caption("a photo of a cat")


def test_toy_judge_takes_every_image_input_the_rewards_take():
    """Float HWC arrays in [0, 1] scored 0 (read as 0..255 bytes), a 4-D float HWC array and a list of [3, H, W]
    tensors failed inside PIL; the CLIP-family rewards take all of them."""
    import torch

    from reward_models import get_reward

    scene = all_scenes()[5]
    img, caption = render(scene), short_caption(scene)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    inputs = [[Image.fromarray(img)], [img], [img.astype(np.float32) / 255], (img.astype(np.float32) / 255)[None],
              [chw], [chw.float() / 255], chw[None], chw[None].float() / 255, chw[None].float().numpy() / 255]
    judge = get_reward("toy-judge")
    assert [judge(x, [caption])[0].tolist() for x in inputs] == [[1.0]] * len(inputs)


def test_toy_table_refuses_a_model_name_given_twice(tmp_path, capsys):
    """A second --model NAME= (or one named base) replaced the first without a word: its row was another model's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_table", Path(__file__).parent.parent / "benchmarks" /
                                                  "toy_table.py")
    toy_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_table)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"")
    for models in (["a=" + str(lora), "a=" + str(lora)], ["base=" + str(lora)]):
        with pytest.raises(SystemExit) as exit_:
            toy_table.main([arg for m in models for arg in ("--model", m)] + ["--out", str(tmp_path / "t.json")])
        assert exit_.value.code == 2 and "is taken" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_toy_judge_names_the_captions_it_cannot_read_shortened():
    """A 500-word caption was printed whole in the error: a 2.9 kB line."""
    import pytest

    from reward_models import get_reward
    from reward_models.base import PromptsRejected

    long = "a photo of " + "a very detailed thing " * 100
    with pytest.raises(PromptsRejected) as err:
        get_reward("toy-judge").check_prompts([long, "a cat"])
    assert f"are not: '{long[:77]}...', 'a cat'" in str(err.value) and len(str(err.value)) < 400
