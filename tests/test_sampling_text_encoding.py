"""Samplers take embeddings in the run's text encoding (t2i_align/sampling.py), and a model tuned with an
encoding is sampled with it (the t2i_align_text_encoding.json record, `--text-encoding`)."""
from __future__ import annotations

import json

import pytest
import torch

from t2i_align import adapters, models
from t2i_align.conditioning.text import TEXT_ENCODING_FILE, read_text_encoding, text_encoding_key, write_text_encoding
from t2i_align.config import ConfigError, LoraConfig, ModelConfig
from t2i_align.config.sections import TextEncodingConfig
from t2i_align.models import ModelLoadError
from t2i_align.sampling import _decode, generate, load_pipeline, pipeline_components
from t2i_align.toy.scenes import Scene, long_caption

from helpers import one_torch_thread, save_tiny_pipeline, tiny_sdxl_pipeline  # noqa: F401 (autouse fixture)

SHORT = ["a small red circle at the top left on a white background",
         "a large blue square at the bottom right on a gray background"]
SEEDS = [0, 10_000]


def _from_strings(pipe, prompts, seeds, negative_prompt=None, **kwargs):
    """What the pipeline itself makes from strings (the old `generate`)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    negative = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    latents = pipe(prompts, generator=gens, output_type="latent", negative_prompt=negative, **kwargs).images
    return latents, _decode(pipe, latents)


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy")


@pytest.mark.parametrize("negative_prompt", [None, "a green triangle"])
def test_clip77_embeddings_give_the_pipelines_own_images(toy_pipe, negative_prompt):
    samples = generate(toy_pipe, SHORT, SEEDS, num_inference_steps=3, guidance_scale=3.0,
                       negative_prompt=negative_prompt)
    latents, images = _from_strings(toy_pipe, SHORT, SEEDS, negative_prompt, num_inference_steps=3,
                                    guidance_scale=3.0)
    torch.testing.assert_close(samples.latents, latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(samples.images, images, atol=1e-6, rtol=0)


def test_an_image_does_not_depend_on_the_batch_it_is_made_in(toy_pipe):
    """Each image has its own seed's generator, as in diffusers: the same image in a batch of 3 or alone (a
    compare.py or generate.py at another --batch-size, an out-of-memory retry at half the batch)."""
    prompts, seeds = SHORT + SHORT[:1], [0, 10_000, 7]
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, negative_prompt="a green triangle")
    together = generate(toy_pipe, prompts, seeds, batch_size=3, **kwargs)
    alone = generate(toy_pipe, prompts, seeds, batch_size=1, **kwargs)
    torch.testing.assert_close(together.latents, alone.latents, atol=1e-4, rtol=0)
    assert not torch.allclose(together.latents[0], together.latents[2], atol=1e-2)  # seeds 0 and 7 differ


def test_sdxl_embeddings_give_the_pipelines_own_images():
    """SDXL: pooled embeddings too, and zeros for the unconditional branch (force_zeros_for_empty_prompt)."""
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16)
    for negative in (None, "a dog", ""):  # "" is encoded, as the pipeline does; only None gives zeros
        samples = generate(pipe, ["a cat", "a photo"], [3, 4], negative_prompt=negative, **kwargs)
        latents, _ = _from_strings(pipe, ["a cat", "a photo"], [3, 4], negative, **kwargs)
        torch.testing.assert_close(samples.latents, latents, atol=1e-6, rtol=0)


def test_segments_sampling_follows_the_sentence_beyond_77_tokens(toy_pipe):
    """Two long captions that differ only in their last sentence (the background, past token 77): clip77 gives
    the same image for both, segments different ones."""
    white, black = (long_caption(Scene("red", "circle", "large", "top left", bg)) for bg in ("white", "black"))
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0)
    with pytest.warns(UserWarning, match="77-token context"):
        clip77 = generate(toy_pipe, [white, black], [5, 5], **kwargs).latents
    assert torch.equal(clip77[0], clip77[1])
    pipeline_components(toy_pipe, TextEncodingConfig("segments"))
    try:
        segments = generate(toy_pipe, [white, black], [5, 5], **kwargs).latents
    finally:
        pipeline_components(toy_pipe, TextEncodingConfig())
    assert (segments[0] - segments[1]).abs().max() > 1e-3


def test_build_pipeline_carries_the_runs_text_encoding(tmp_path):
    folder = save_tiny_pipeline("sd15", tmp_path / "sd15")
    comp = models.load_components(ModelConfig(pretrained=str(folder),
                                              text_encoding=TextEncodingConfig("segments", 32)))
    pipe = models.build_pipeline(comp)
    carried = pipeline_components(pipe)
    assert carried.text_encoding == TextEncodingConfig("segments", 32) and carried.unet is pipe.unet
    assert carried.truncation is not comp.truncation  # sampling does not add to the training count
    samples = generate(pipe, ["a cat. a photo!"], [0], num_inference_steps=2, height=16, width=16)
    assert samples.images.shape == (1, 3, 16, 16)


def test_text_encoding_record_round_trip_and_errors(tmp_path):
    path = write_text_encoding(tmp_path, "segments", 120)
    assert path == tmp_path / TEXT_ENCODING_FILE
    assert json.loads(path.read_text()) == {"kind": "segments", "token_budget": 120}
    assert read_text_encoding(tmp_path) == TextEncodingConfig("segments", 120)
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"")
    assert read_text_encoding(weights) == TextEncodingConfig("segments", 120)  # a weights file: its folder's
    assert read_text_encoding(tmp_path / "no-such-folder") is None
    path.write_text('{"kind": "t5", "token_budget": 3}')
    with pytest.raises(ConfigError, match="not a valid text-encoding record.*kind"):
        read_text_encoding(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=TEXT_ENCODING_FILE):
        read_text_encoding(tmp_path)
    with pytest.raises(ConfigError, match="token_budget"):
        write_text_encoding(tmp_path, "segments", 0)
    assert text_encoding_key(TextEncodingConfig()) == {}
    assert text_encoding_key(TextEncodingConfig("segments", 99)) == {"text_encoding": "segments", "token_budget": 99,
                                                                     "sentence_split": 2}  # segments.split_sentences


def test_load_pipeline_applies_the_recorded_encoding_of_a_model_folder(tmp_path):
    folder = save_tiny_pipeline("sd15", tmp_path / "full")
    assert pipeline_components(load_pipeline(folder)).text_encoding == TextEncodingConfig()
    assert pipeline_components(load_pipeline(folder, text_encoding="segments")).text_encoding.kind == "segments"
    write_text_encoding(folder, "segments", 64)
    assert pipeline_components(load_pipeline(folder)).text_encoding == TextEncodingConfig("segments", 64)
    assert pipeline_components(load_pipeline(folder, text_encoding="segments")).text_encoding.token_budget == 64
    with pytest.raises(ModelLoadError, match="tuned with text encoding 'segments'.*'clip77' was asked for"):
        load_pipeline(folder, text_encoding="clip77")


def test_load_pipeline_applies_the_recorded_encoding_of_a_lora(tmp_path):
    folder = save_tiny_pipeline("sd15", tmp_path / "base")
    comp = models.load_components(ModelConfig(pretrained=str(folder)))
    from peft.utils import get_peft_model_state_dict

    adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=2))
    lora = tmp_path / "final"
    type(models.build_pipeline(comp)).save_lora_weights(str(lora), unet_lora_layers=get_peft_model_state_dict(
        comp.unet))
    write_text_encoding(lora, "segments", 48)
    weights = lora / "pytorch_lora_weights.safetensors"
    assert pipeline_components(load_pipeline(folder, lora=weights)).text_encoding == TextEncodingConfig(
        "segments", 48)
    with pytest.raises(ModelLoadError, match="final was tuned with text encoding 'segments'"):
        load_pipeline(folder, lora=lora, text_encoding="clip77")


def test_pipeline_components_rejects_a_pipeline_without_text_encoder():
    from diffusers import StableDiffusionPipeline

    full = tiny_sdxl_pipeline()
    with pytest.raises(ModelLoadError, match="cannot sample with a"):
        pipeline_components(type("Img2Img", (), {})())
    bare = StableDiffusionPipeline(vae=full.vae, text_encoder=None, tokenizer=None, unet=full.unet,
                                   scheduler=full.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with pytest.raises(ModelLoadError, match="this StableDiffusionPipeline has no tokenizer or text_encoder;"):
        pipeline_components(bare)


def _script(name):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "sample"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"sample_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_scripts_take_text_encoding(tmp_path, capsys):
    base = save_tiny_pipeline("sd15", tmp_path / "base")
    tuned = save_tiny_pipeline("sd15", tmp_path / "tuned", seed=1)
    write_text_encoding(tuned, "segments", 80)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SHORT) + "\n")  # toy captions: compare's default reward is the toy judge
    fast = ["--prompts", str(prompts), "--steps", "1", "--seeds-per-prompt", "2", "--height", "32", "--width", "32"]
    gen = _script("generate")
    result = gen.main(["--model", str(tuned), "--out", str(tmp_path / "s"), *fast])
    assert result["images"] == 4
    meta = json.loads((tmp_path / "s" / "metadata.jsonl").read_text().splitlines()[0])
    assert (meta["text_encoding"], meta["token_budget"]) == ("segments", 80)  # the recorded one, used and written
    run = _script("common").run_cli
    assert run(lambda: gen.main(["--model", str(tuned), "--text-encoding", "clip77", "--out", str(tmp_path / "x"),
                                 *fast])) == 2
    assert "tuned with text encoding 'segments'" in capsys.readouterr().err
    compared = _script("compare").main(["--base", str(base), "--model", str(tuned), "--base-text-encoding", "segments",
                                        *fast])
    assert compared["base"]["text_encoding"] == "segments" and compared["tuned"]["token_budget"] == 80
    assert compared["base"]["token_budget"] == 240  # --base-text-encoding segments, no record: the default budget


def test_toy_cli_takes_text_encoding(tmp_path):
    from t2i_align.toy.__main__ import _parser, _pipe

    folder = save_tiny_pipeline("sd15", tmp_path / "m")
    write_text_encoding(folder, "segments", 40)
    args = _parser().parse_args(["evaluate", "--model", str(folder)])
    assert pipeline_components(_pipe(args)).text_encoding == TextEncodingConfig("segments", 40)
    args = _parser().parse_args(["evaluate", "--model", str(folder), "--text-encoding", "clip77"])
    with pytest.raises(ModelLoadError, match="'clip77' was asked for"):
        _pipe(args)
    assert _parser().parse_args(["pairs", "--out", "x", "--text-encoding", "segments"]).text_encoding == "segments"


def test_toy_compare_samples_each_side_in_its_own_encoding(tmp_path, monkeypatch):
    """`toy compare --text-encoding segments` sampled the base in segments too, which it never read in training."""
    import t2i_align.toy.__main__ as toy
    import t2i_align.toy.demo as demo  # imported before the patch: it binds evaluate() at import, which would
    import t2i_align.toy.evaluate as evaluate  # keep the stand-in for later tests (the demo's)

    from types import SimpleNamespace

    sides = []
    monkeypatch.setattr(toy, "_pipe", lambda args: sides.append((args.model, args.text_encoding)))
    monkeypatch.setattr(evaluate, "evaluate", lambda pipe, *a, **k: SimpleNamespace(summary={}))
    monkeypatch.setattr(evaluate, "judge_scores", lambda run: [])
    monkeypatch.setattr(demo, "tests_of", lambda *a: {})
    for flags, expected in ((["--text-encoding", "segments"], [("toy", None), ("tuned", "segments")]),
                            (["--base-text-encoding", "segments"], [("toy", "segments"), ("tuned", None)])):
        sides.clear()
        toy.cmd_compare(toy._parser().parse_args(["compare", "--model", "tuned", *flags]))
        assert sides == expected


def test_a_pipeline_without_one_text_encoder_names_it():
    """A plain SDXL pipeline lacking text_encoder_2 (model_index.json listing it as [null, null]) was said to have
    "no tokenizer or text encoder", though its first ones were there."""
    pipe = tiny_sdxl_pipeline()
    pipe.text_encoder_2 = None
    with pytest.raises(ModelLoadError, match=r"this StableDiffusionXLPipeline has no text_encoder_2; t2i-align "):
        pipeline_components(pipe)
