"""Model folders that sampling loaded differently from training: a base without vae/ given --vae, a shard an
index names that is not there, a tokenizer without its context length."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from t2i_align.model_folders import ModelLoadError, resolve_pretrained

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401 (autouse fixture)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


def _generate():
    sys.path.insert(0, str(SAMPLE))
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_base_without_vae_samples_with_vae_as_it_trained_with_model_vae(sd15_dir, tmp_path):
    """Training takes such a base with model.vae (the folder check skips vae/), but load_pipeline and the sample/
    scripts refused it before --vae was considered ("vae is missing ... download or copy it again")."""
    from diffusers import AutoencoderKL

    from t2i_align.sampling import load_pipeline

    base = shutil.copytree(sd15_dir, tmp_path / "novae")
    shutil.rmtree(base / "vae")
    with pytest.raises(ModelLoadError, match="vae is missing.*or decode with another VAE .*--vae DIR"):
        load_pipeline(base)
    pipe = load_pipeline(base, vae=sd15_dir)
    own = AutoencoderKL.from_pretrained(sd15_dir, subfolder="vae")
    assert torch.equal(pipe.vae.decoder.conv_out.weight, own.decoder.conv_out.weight)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = _generate().main(["--model", str(base), "--vae", str(sd15_dir), "--prompts", str(prompts),
                               "--steps", "1", "--seeds-per-prompt", "1", "--out", str(tmp_path / "out")])
    assert result["images"] == 1


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_shard_the_index_names_that_is_missing_is_named_by_the_folder_check(sd15_dir, tmp_path, part):
    """The folder check (the dry run, sampling's check_weights) passed a sharded part missing a shard; the load
    failed later ("does not appear to have a file named ...-00002-of-... which is required")."""
    folder = shutil.copytree(sd15_dir, tmp_path / "sharded")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if part == "unet" else CLIPTextModel
    model = cls.from_pretrained(folder / part)
    shutil.rmtree(folder / part)
    model.save_pretrained(folder / part, max_shard_size="40KB")
    shards = sorted((folder / part).glob("*-of-*.safetensors"))
    assert len(shards) >= 2 and resolve_pretrained(str(folder)) == folder  # whole: passes
    plain = next((folder / part).glob("*.index.json")).name.replace(".index.json", "")
    shards[1].unlink()
    told = f"{part} component but .*{part}/{plain}.index.json names 1 missing shard file.s. .e.g. {shards[1].name}."
    with pytest.raises(ModelLoadError, match=told + ": the folder is incomplete"):
        resolve_pretrained(str(folder))
    fp16 = plain.replace(".safetensors", ".fp16.safetensors")  # a whole variant: read with --variant fp16 only
    (folder / part / fp16).write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=told):
        resolve_pretrained(str(folder))
    assert resolve_pretrained(str(folder), variant="fp16") == folder
    (folder / part / fp16).unlink()
    (folder / part / plain).write_bytes(b"x")  # a plain file: diffusers reads the index first, transformers the file
    if part == "unet":
        with pytest.raises(ModelLoadError, match=told):
            resolve_pretrained(str(folder))
    else:
        assert resolve_pretrained(str(folder)) == folder


def test_missing_shard_looks_at_what_the_loader_reads(tmp_path):
    """The set of the variant asked for, else the plain one; in it diffusers reads a safetensors index, then a file,
    then a .bin file (no .bin index), transformers a safetensors file, its index, a .bin file, its index."""
    import json

    from t2i_align.weight_files import missing_shard

    def folder(name, variant=None, transformers=False, **files):
        sub = tmp_path / name
        sub.mkdir()
        for file, shards in files.items():
            text = json.dumps({"weight_map": {"a": shards[0], "b": shards[-1]}}) if shards else "x"
            (sub / file.replace("__", ".")).write_text(text)
        return missing_shard(sub, variant, transformers)

    w = "diffusion_pytorch_model"
    # a whole .bin index beside a safetensors index whose shards never came: the safetensors one is read
    assert "names 2 missing" in folder("bin_whole", **{f"{w}__bin__index__json": ["b1.bin", "b2.bin"], "b1__bin": [],
                                                       "b2__bin": [], f"{w}__safetensors__index__json": ["s1", "s2"]})
    assert folder("plain_whole", **{f"{w}__safetensors": []}) is None
    # variants only: refused when every one is broken, not when one is whole (--variant picks it)
    assert folder("one_whole", **{f"{w}__fp16__safetensors": [], f"{w}__safetensors__index__bf16__json": ["x"]}) is None
    assert "names 1 missing" in folder("all_broken", **{f"{w}__safetensors__index__fp16__json": ["y"]})
    assert folder("stale_bin_index", **{f"{w}__bin": [], f"{w}__bin__index__json": ["gone.bin"]}) is None
    assert folder("te_file_first", transformers=True, **{"model__safetensors": [], "model__safetensors__index__json":
                                                         ["gone"]}) is None
    assert "names 1 missing" in folder("te_bin_index", transformers=True, **{"pytorch_model__bin__index__json":
                                                                              ["gone.bin"]})
    broken_fp16 = {f"{w}__safetensors": [], f"{w}__safetensors__index__fp16__json": ["gone"]}
    assert folder("plain_read", **broken_fp16) is None  # without --variant the whole plain file is read
    assert "names 1 missing" in folder("fp16_read", variant="fp16", **broken_fp16)


def test_sampling_refuses_a_tokenizer_without_its_context_length(sd15_dir, tmp_path):
    """Training refused a tokenizer_config.json without model_max_length (1e30); load_pipeline loaded it, and the
    first prompt failed with an OverflowError traceback ("int too big to convert")."""
    from t2i_align.sampling import load_pipeline

    folder = shutil.copytree(sd15_dir, tmp_path / "notmax")
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_max_length")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="tokenizer: the tokenizer's model_max_length 1e.30 does not fit the "
                                             "text encoder's 77 positions"):
        load_pipeline(folder)


def test_the_tokenizer_check_leaves_encoders_without_a_fixed_context_alone(tmp_path):
    """T5 has relative positions (no max_position_embeddings): the check raised AttributeError before the
    pipeline's own "cannot sample with" message."""
    from types import SimpleNamespace

    from t2i_align.pipeline_checks import check_tokenizer

    t5 = SimpleNamespace(config=SimpleNamespace())
    check_tokenizer(tmp_path, SimpleNamespace(model_max_length=512), t5)
    clip = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=77))
    check_tokenizer(tmp_path, SimpleNamespace(model_max_length=77), clip)
    with pytest.raises(ModelLoadError, match="model_max_length 1e[+]30 does not fit the text encoder's 77"):
        check_tokenizer(tmp_path, SimpleNamespace(model_max_length=int(1e30)), clip)
