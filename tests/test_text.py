"""Prompt encoding (SD1.5 / SDXL), truncation accounting and SDXL added conditioning."""
from __future__ import annotations

import warnings

import pytest
import torch

from t2i_align import models
from t2i_align.conditioning.text import (
    PromptEmbeds, encode_prompts, sdxl_time_ids, unet_added_cond_kwargs,
)
from t2i_align.config import ModelConfig

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401 (autouse fixture)

PROMPTS = ["a photo of a cat", "a dog on a red sofa, 4k"]
LONG = " ".join(["cat"] * 100)  # "cat" is one token in the tiny vocabulary: 100 + BOS + EOS = 102 tokens


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")
    return models.load_components(ModelConfig(pretrained=str(folder)))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe")
    return models.load_components(ModelConfig(pretrained=str(folder)))


def test_sd15_matches_diffusers_pipeline(sd15):
    embeds = encode_prompts(sd15, PROMPTS)
    assert embeds.prompt_embeds.shape == (2, 77, 32) and embeds.pooled_prompt_embeds is None
    expected, _ = models.build_pipeline(sd15).encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(embeds.prompt_embeds, expected)


def test_sdxl_matches_diffusers_pipeline(sdxl):
    embeds = encode_prompts(sdxl, PROMPTS)
    assert embeds.prompt_embeds.shape == (2, 77, 64) and embeds.pooled_prompt_embeds.shape == (2, 32)
    expected, _, pooled, _ = models.build_pipeline(sdxl).encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(embeds.prompt_embeds, expected)
    torch.testing.assert_close(embeds.pooled_prompt_embeds, pooled)


def test_truncation_is_counted_and_warned_once(sd15):
    sd15.truncation = type(sd15.truncation)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(sd15, PROMPTS)  # short prompts: no warning
    with pytest.warns(UserWarning, match="1 of 2 prompts.*77-token.*25 tokens were dropped"):
        encode_prompts(sd15, [LONG, "a cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(sd15, [LONG])  # counted, not warned again
    stats = sd15.truncation
    assert (stats.prompts_seen, stats.prompts_truncated, stats.tokens_dropped) == (5, 2, 50)


def test_sampling_warns_once_a_run_without_pointing_to_trainings_totals(sd15):
    """Every pipeline built from a run's components (a gallery, each RAFT round) shares one sampling count: one
    warning a run, and it does not send the reader to prompts_truncated, the training prompts' count."""
    from t2i_align.sampling import pipeline_components

    sd15.truncation, sd15.sampling_truncation = type(sd15.truncation)(), type(sd15.truncation)(totals="")
    with pytest.warns(UserWarning, match="1 of 1 prompts.*for the first batch that had any\\. LongAlign") as caught:
        encode_prompts(pipeline_components(models.build_pipeline(sd15)), [LONG])
    assert "training" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(pipeline_components(models.build_pipeline(sd15)), [LONG])  # the next round: counted only
    assert (sd15.sampling_truncation.prompts_truncated, sd15.truncation.prompts_truncated) == (2, 0)
    with pytest.warns(UserWarning, match="training logs the totals"):
        encode_prompts(sd15, [LONG])  # training's own count


def test_sdxl_counts_truncation_once_per_prompt(sdxl):
    sdxl.truncation = type(sdxl.truncation)()
    with pytest.warns(UserWarning, match="25 tokens were dropped"):
        encode_prompts(sdxl, [LONG])
    assert (sdxl.truncation.prompts_truncated, sdxl.truncation.tokens_dropped) == (1, 25)


def test_sdxl_time_ids_layout_and_broadcast():
    ids = sdxl_time_ids((512, 768), (0, 32), (1024, 1024))
    assert ids.tolist() == [[512, 768, 0, 32, 1024, 1024]]
    per_sample = sdxl_time_ids(torch.tensor([[512, 512], [600, 800]]), (0, 0), (1024, 1024))
    assert per_sample.shape == (2, 6) and per_sample[1].tolist() == [600, 800, 0, 0, 1024, 1024]
    assert sdxl_time_ids((8, 8), (0, 0), (8, 8), batch_size=3).shape == (3, 6)
    with pytest.raises(ValueError, match="rows"):
        sdxl_time_ids(torch.zeros(2, 2), torch.zeros(3, 2), (8, 8))


def test_added_cond_kwargs_per_family(sd15, sdxl):
    assert unet_added_cond_kwargs(sd15.spec, encode_prompts(sd15, PROMPTS)) == {}
    embeds = encode_prompts(sdxl, PROMPTS)
    added = unet_added_cond_kwargs(sdxl.spec, embeds, sdxl_time_ids((16, 16), (0, 0), (16, 16)))
    assert set(added) == {"text_embeds", "time_ids"} and added["time_ids"].dtype == torch.float32
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # one row broadcast to the batch
    assert added["text_embeds"] is embeds.pooled_prompt_embeds
    with pytest.raises(ValueError, match="sdxl_time_ids"):
        unet_added_cond_kwargs(sdxl.spec, embeds)
    with pytest.raises(ValueError, match="rows"):
        unet_added_cond_kwargs(sdxl.spec, embeds, torch.zeros(3, 6))


def test_prompt_embeds_repeat_and_to():
    embeds = PromptEmbeds(torch.arange(6.0).reshape(2, 1, 3), torch.ones(2, 4))
    doubled = embeds.repeat(2)
    assert len(doubled) == 4 and torch.equal(doubled.prompt_embeds[2:], embeds.prompt_embeds)
    assert torch.equal(doubled.prompt_embeds[:2], embeds.prompt_embeds)  # [e; e], not each row twice
    assert torch.equal(doubled.pooled_prompt_embeds, torch.ones(4, 4))
    half = embeds.to(torch.float16)
    assert half.prompt_embeds.dtype == half.pooled_prompt_embeds.dtype == torch.float16
    assert PromptEmbeds(torch.zeros(1, 2, 3)).repeat(2).pooled_prompt_embeds is None
