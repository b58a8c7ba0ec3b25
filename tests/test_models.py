"""Model loading, family detection, attention backend, LoRA and reference on tiny random pipelines."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from t2i_align import adapters, model_folders, models
from t2i_align.conditioning.text import encode_prompts, sdxl_time_ids, unet_added_cond_kwargs
from t2i_align.config import LoraConfig, ModelConfig
from t2i_align.diffusion import scale_latents, unscale_latents
from t2i_align.models import ModelLoadError

from helpers import export_random_lora, one_torch_thread, save_tiny_pipeline, tiny_sd15_pipeline  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe")


def _unet_out(components, prompts, time_ids=None, seed=0, unet=None):
    """`unet` (default: the components') on seeded latents and the components' encoding of `prompts`."""
    unet = components.unet if unet is None else unet
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 4, 8, 8, generator=gen)
    embeds = encode_prompts(components, prompts).to(components.unet.dtype)  # accelerate autocasts in training
    added = unet_added_cond_kwargs(components.spec, embeds, time_ids)
    timesteps = torch.tensor([10, 500][: len(prompts)])
    with torch.no_grad():
        return unet(latents, timesteps, embeds.prompt_embeds, added_cond_kwargs=added).sample


def test_detect_family_reads_model_index(sd15_dir, sdxl_dir, tmp_path):
    assert models.detect_family(sd15_dir) is models.SD15
    assert models.detect_family(sdxl_dir) is models.SDXL
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    supported = "KandinskyV22Pipeline.*StableDiffusionPipeline.*StableDiffusionXLPipeline"
    with pytest.raises(ModelLoadError, match=supported):
        models.detect_family(tmp_path)
    assert models.model_family(ModelConfig(family="sd15"), tmp_path) is models.SD15  # an unknown class: trusted
    # the SDXL refiner (its 5 time ids and t % 200 branch of the official code are not implemented): refused, even
    # with model.family given
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
               "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (tmp_path / "model_index.json").write_text(json.dumps(refiner))
    for family in ("auto", "sdxl"):
        with pytest.raises(ModelLoadError, match="is an SDXL refiner / img2img pipeline: not supported"):
            models.model_family(ModelConfig(family=family), tmp_path)
    # an SDXL base saved from an img2img pipeline (both encoders, no aesthetic score): model.family=sdxl trusted
    base = {**refiner, "requires_aesthetics_score": False, "text_encoder": ["transformers", "CLIPTextModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(base))
    assert models.model_family(ModelConfig(family="sdxl"), tmp_path) is models.SDXL


def test_sd15_round_trip_and_unet_forward(sd15_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir), weight_dtype="bf16"))
    assert comp.spec.name == "sd15" and len(comp.tokenizers) == len(comp.text_encoders) == 1
    assert type(comp.scheduler).__name__ == "DDPMScheduler"
    assert comp.text_encoders[0].dtype == torch.bfloat16 and comp.vae.dtype == torch.bfloat16
    assert comp.unet.dtype == torch.float32
    frozen = [*comp.text_encoders[0].parameters(), *comp.vae.parameters()]
    assert not any(p.requires_grad for p in frozen) and not comp.vae.training
    out = _unet_out(comp, ["a photo of a cat", "a dog"])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    original = tiny_sd15_pipeline(seed=0).unet  # the UNet sd15_dir was saved from, rebuilt from its seed
    assert torch.equal(out, _unet_out(comp, ["a photo of a cat", "a dog"], unet=original))


def test_sdxl_round_trip_keeps_vae_fp32_and_uses_time_ids(sdxl_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sdxl_dir), weight_dtype="bf16"))
    assert comp.spec is models.SDXL and len(comp.text_encoders) == 2
    assert comp.vae.dtype == torch.float32, "the SDXL VAE must stay fp32 (fp16/bf16 NaN trap)"
    assert all(enc.dtype == torch.bfloat16 for enc in comp.text_encoders)
    prompts = ["a photo of a cat", "a dog"]
    out = _unet_out(comp, prompts, sdxl_time_ids((16, 16), (0, 0), (16, 16)))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    other = _unet_out(comp, prompts, sdxl_time_ids((64, 48), (8, 4), (16, 16)))
    assert not torch.allclose(out, other), "time ids must reach the UNet"


def test_an_fp32_vae_runs_in_fp32_inside_a_half_precision_autocast(sdxl_dir):
    """The SDXL VAE is kept fp32 (it overflows in fp16), but RAFT's sampling, reward fine-tuning and SePPO's
    re-encoding run inside the step's autocast: encode and both decodes must still compute in fp32, i.e. give
    exactly what they give outside it (bf16 stands in for fp16, which CPU autocast does not cover well)."""
    from types import SimpleNamespace

    from t2i_align.batches import encode_images
    from t2i_align.rollout import decode
    from t2i_align.sampling import _decode

    comp = models.load_components(ModelConfig(pretrained=str(sdxl_dir), weight_dtype="bf16"))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run():
        torch.manual_seed(2)  # encode draws a posterior sample
        return (encode_images(comp, pixels), decode(comp.vae, latents, grad=False),
                _decode(SimpleNamespace(vae=comp.vae), latents))
    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run()
    for a, b in zip(inside, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_separate_fp16_safe_vae_follows_weight_dtype(sdxl_dir, tmp_path):
    """model.vae swaps in another VAE; one marked force_upcast=False (like sdxl-vae-fp16-fix) may be cast."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    AutoencoderKL.from_config(vae.config, force_upcast=False).save_pretrained(tmp_path / "vae-fix")
    comp = models.load_components(
        ModelConfig(pretrained=str(sdxl_dir), vae=str(tmp_path / "vae-fix"), weight_dtype="bf16")
    )
    assert comp.vae.dtype == torch.bfloat16 and comp.vae.config.force_upcast is False
    with pytest.raises(ModelLoadError, match="model.vae=/path/to/folder"):
        models.load_components(ModelConfig(pretrained=str(sdxl_dir), vae=str(tmp_path / "missing")))


def test_explicit_family_mismatch_is_rejected(sd15_dir):
    with pytest.raises(ModelLoadError, match="model.family=sdxl but .* is a sd15 pipeline: point model.pretrained at "
                                             "a sdxl folder, or train it with a sd15 config"):
        models.load_components(ModelConfig(pretrained=str(sd15_dir), family="sdxl"))


def test_missing_path_says_how_to_pass_a_local_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model.pretrained=/path/to/folder"):
        models.resolve_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no model_index.json.*model.pretrained=/path/to/folder"):
        models.resolve_pretrained(str(tmp_path))


def test_hub_id_offline_fails_fast_with_local_folder_hint(monkeypatch):
    """Offline, a hub id is one error naming the local-folder setting, with no connection tried (a wall-clock bound
    here was a timed assertion; a network attempt is what made it slow)."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE.*model.pretrained=/path/to/folder"):
        models.resolve_pretrained("t2i-align-tests/not-a-cached-repo")


def test_a_hub_vae_fetches_a_vaes_files_only(tmp_path, monkeypatch):
    """model.vae as a hub id took every *.safetensors file of the repo: a pipeline repo's UNets and text
    encoders (tens of GB) for one VAE."""
    import fnmatch

    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(kw) or str(tmp_path))
    models.resolve_pretrained("t2i-align-tests/a-vae", pipeline=False, key="model.vae")
    files = ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "sd_xl_base_1.0.safetensors"]
    taken = [f for f in files if any(fnmatch.fnmatch(f, p) for p in asked[0]["allow_patterns"])]
    assert taken == files[:4]


def test_local_looking_names_are_not_hub_ids(tmp_path, monkeypatch):
    """`data/sd15` (a typo, with a data/ folder here) and `models/sd15.safetensors` were taken for hub ids: the dry
    run passed them and the run went to the Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ModelLoadError, match=r"no such folder \(read as a local path, since \./data exists; for the "
                                             "hub id, run from another folder"):
        models.resolve_pretrained("data/sd15")
    for name in ("data/sd15", "models/sd15.safetensors"):
        with pytest.raises(ModelLoadError, match="no such folder"):
            models.resolve_pretrained(name)
        assert not model_folders._is_hub_id(name)
    with pytest.raises(ModelLoadError, match=r"single-file checkpoint.*StableDiffusionPipeline as P; "
                                             r"P.from_single_file\('models/sd15.safetensors', config="):
        models.resolve_pretrained("models/sd15.safetensors")
    (tmp_path / "sd15.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a folder.*from_single_file"):
        models.resolve_pretrained("sd15.safetensors")
    # a VAE file: AutoencoderKL converts it (a pipeline class cannot), with a local config (no hub here)
    with pytest.raises(ModelLoadError, match=r"AutoencoderKL as P; P.from_single_file\('sd15.safetensors', config="
                                             r"'A_LOCAL_VAE_FOLDER'\)"):
        models.resolve_pretrained("sd15.safetensors", pipeline=False, key="model.vae")
    with pytest.raises(ModelLoadError, match=r"AutoencoderKL as P"):  # sample/'s and merge_lora's flag alike
        models.resolve_pretrained("sd15.safetensors", pipeline=False, key="--vae")
    (tmp_path / "sd_xl_base_1.0.safetensors").write_bytes(b"x")  # it gave SD1.5's command, SDXL's in brackets
    with pytest.raises(ModelLoadError, match=r"StableDiffusionXLPipeline as P; .*config='A_LOCAL_SDXL_FOLDER'"):
        models.resolve_pretrained("sd_xl_base_1.0.safetensors")
    (tmp_path / "pipe" / "unet").mkdir(parents=True)  # a diffusers folder's weights file: that folder is meant
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"is a file, not a folder.* It is a file of the pipeline folder pipe: "
                                             "give that folder"):
        models.resolve_pretrained("pipe/unet/diffusion_pytorch_model.safetensors")
    assert model_folders._is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_a_partial_pipeline_folder_is_named_before_loading(sd15_dir, tmp_path):
    """A folder whose unet/ held only config.json passed the dry run and failed with diffusers' OSError traceback
    after the text encoder and VAE had loaded."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(sd15_dir, partial)
    for f in (partial / "unet").iterdir():
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(ModelLoadError, match="unet component but .*unet holds no weights file.*incomplete"):
        models.resolve_pretrained(str(partial))
    shutil.rmtree(partial)
    shutil.copytree(sd15_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelLoadError, match="vae component but .*vae is missing"):
        models.resolve_pretrained(str(partial))
    assert models.resolve_pretrained(str(partial), skip_parts=("vae",)) == partial  # model.vae given instead
    # cloned without git-lfs: a pointer per weights file (a bare SafetensorError traceback from the text encoder);
    # a truncated file: one line naming the component
    shutil.rmtree(partial)
    shutil.copytree(sd15_dir, partial)
    weights = next((partial / "text_encoder").glob("*.safetensors"))
    whole, pointer = weights.read_bytes(), "version https://git-lfs.github.com/spec/v1\noid sha256:0a\nsize 49226\n"
    (partial / "text_encoder" / "pytorch_model.bin").write_text(pointer)  # a copy left unpulled: the real one loads
    assert models.resolve_pretrained(str(partial)) == partial
    weights.write_text(pointer)
    with pytest.raises(ModelLoadError, match="text_encoder/model.safetensors is a git-lfs pointer, not the weights "
                                             ".cloned without git-lfs.: install git-lfs and run `git lfs pull`"):
        models.resolve_pretrained(str(partial))
    weights.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ModelLoadError, match="could not load text_encoder .CLIPTextModel. from .*text_encoder: "):
        models.load_components(ModelConfig(pretrained=str(partial)))


@pytest.mark.parametrize("part, remove, told", [
    ("tokenizer", ("tokenizer.json", "vocab.json"), "tokenizer holds no vocabulary"),  # transformers 5 / 4 saves
    ("text_encoder", ("config.json",), "text_encoder has no config.json"),
    ("scheduler", ("scheduler_config.json",), "scheduler has no scheduler_config.json")])
def test_a_component_without_its_vocabulary_or_config_is_named_before_loading(sd15_dir, tmp_path, part, remove,
                                                                              told):
    """A tokenizer folder without its vocabulary loaded (transformers 5) as a 2-token tokenizer: every prompt
    encoded alike, and training ran on it. A text encoder without config.json got a default config and a size
    mismatch traceback, a scheduler without its config an OSError traceback."""
    import shutil

    partial = shutil.copytree(sd15_dir, tmp_path / "partial")
    for name in remove:
        (partial / part / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=f"{part} component but .*{told}.*incomplete"):
        models.resolve_pretrained(str(partial))


def test_a_tokenizer_without_its_length_is_refused_at_loading(sdxl_dir, tmp_path):
    """tokenizer_config.json without model_max_length: 1e30, and an OverflowError traceback at the first prompt."""
    import shutil

    broken = shutil.copytree(sdxl_dir, tmp_path / "broken")
    config = json.loads((broken / "tokenizer_2" / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    (broken / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="tokenizer_2: the tokenizer's model_max_length 1e.30 does not fit the "
                                             "text encoder's 77 positions"):
        models.load_components(ModelConfig(pretrained=str(broken)))


def test_an_unreadable_component_is_a_load_error(sd15_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(sd15_dir, partial)
    (partial / "vae" / "config.json").unlink()  # weights there, config gone: diffusers raises OSError
    with pytest.raises(ModelLoadError, match=r"could not load vae \(AutoencoderKL\).*incomplete"):
        models._load_part(partial, models.read_index(partial), "vae")
    # sampling: a truncated weights file (the folder checks see a file) was diffusers' OSError traceback
    from t2i_align.sampling import load_pipeline

    damaged = shutil.copytree(sd15_dir, tmp_path / "damaged")
    weights = next((damaged / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="could not load the pipeline in .*damaged.*download or copy it again"):
        load_pipeline(damaged)


def test_toy_resolves_to_shipped_pipeline(monkeypatch, sd15_dir, tmp_path):
    import t2i_align.toy.assets as assets

    monkeypatch.setattr(assets, "pipeline_dir", lambda: sd15_dir)
    assert models.resolve_pretrained("toy") == sd15_dir
    monkeypatch.setattr(assets, "pipeline_dir", lambda: tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="t2i_align.toy build"):
        models.resolve_pretrained("toy")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_absent_gives_install_hint(sd15_dir):
    with pytest.raises(ModelLoadError, match=r"pip install 't2i-align\[xformers\]'.*model.attention=sdpa"):
        models.load_components(ModelConfig(pretrained=str(sd15_dir), attention="xformers"))


def test_sdpa_checkpointing_and_unknown_backend(sd15_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    cfg = ModelConfig(pretrained=str(sd15_dir), gradient_checkpointing=True, channels_last=True)
    comp = models.load_components(cfg, device="cpu")
    assert all(isinstance(p, AttnProcessor2_0) for p in comp.unet.attn_processors.values())
    assert comp.unet.is_gradient_checkpointing
    assert comp.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ModelLoadError, match="unknown model.attention"):
        models.set_attention_backend(comp.unet, "flash9")
    with pytest.raises(ValueError, match="unknown dtype"):
        models.torch_dtype("fp8")


def test_lora_starts_as_identity_and_trains_only_adapters(sd15_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    before = _unet_out(comp, ["a cat", "a dog"])
    params = adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=4, alpha=8.0))
    after = _unet_out(comp, ["a cat", "a dog"])
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    peft_config = comp.unet.peft_config["default"]
    assert peft_config.r == 4 and peft_config.lora_alpha == 8.0
    trainable = {n for n, p in comp.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(params)
    assert any("to_out.0" in n for n in trainable)
    # Once B moves, the output changes, and the LoRA reference (adapters off) still gives the base output.
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
    assert not torch.allclose(_unet_out(comp, ["a cat", "a dog"]), before, atol=1e-4)
    with adapters.adapters_off(comp.unet):
        torch.testing.assert_close(_unet_out(comp, ["a cat", "a dog"]), before, atol=1e-6, rtol=0)
        assert not torch.is_grad_enabled()
    assert not torch.allclose(_unet_out(comp, ["a cat", "a dog"]), before, atol=1e-4), "adapters back on after"
    assert all(p.requires_grad for p in params), "and trainable again"


def test_lora_defaults_and_errors(sd15_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=2, init="default"))
    assert comp.unet.peft_config["default"].lora_alpha == 2, "alpha None means alpha = rank"
    fresh = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    with pytest.raises(ModelLoadError, match="target_modules"):
        adapters.add_lora(fresh.unet, LoraConfig(enabled=True, target_modules=["no_such_layer"]))
    # one misspelt entry among good ones: peft skipped it silently, training a smaller LoRA than configured
    with pytest.raises(ModelLoadError, match=r"lora.target_modules: \['to_out0', 'conv_1'\] match no layer"):
        adapters.add_lora(fresh.unet, LoraConfig(enabled=True, target_modules=["to_q", "to_out0", "conv_1"]))
    assert not any("lora_" in name for name, _ in fresh.unet.named_parameters())  # refused before adding any
    bad_init = LoraConfig(enabled=True)
    bad_init.init = "pissa_maybe"  # bypasses the config's own validation, as a hand-built config could
    with pytest.raises(ValueError, match="lora.init"):
        adapters.add_lora(fresh.unet, bad_init)
    every = list(fresh.unet.parameters())
    assert len(adapters.trainable_parameters(fresh.unet, LoraConfig(enabled=False))) == len(every)


@pytest.mark.parametrize("family,alpha", [("sd15", None), ("sd15", 16.0), ("sdxl", 1.0)])
def test_lora_export_loads_in_plain_diffusers_at_the_trained_scale(family, alpha, sd15_dir, sdxl_dir, tmp_path):
    """The run's LoRA export (`export_final`) loads with diffusers' own load_lora_weights and gives the trained
    UNet's output, also when lora.alpha != rank: diffusers reloads a file without alpha metadata at alpha = rank."""
    from t2i_align.checkpoints import export_final

    folder = {"sd15": sd15_dir, "sdxl": sdxl_dir}[family]
    comp = models.load_components(ModelConfig(pretrained=str(folder)))
    params = adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=4, alpha=alpha))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    ids = sdxl_time_ids((16, 16), (0, 0), (16, 16)) if family == "sdxl" else None
    tuned = _unet_out(comp, ["a cat", "a dog"], ids)
    final = export_final(models.build_pipeline(comp), comp.unet, True, tmp_path)
    fresh = models.load_components(ModelConfig(pretrained=str(folder)))
    from helpers import plain_lora_kwargs

    models.build_pipeline(fresh).load_lora_weights(final, **plain_lora_kwargs())
    torch.testing.assert_close(_unet_out(fresh, ["a cat", "a dog"], ids), tuned, atol=1e-5, rtol=1e-5)


def test_frozen_reference_is_a_separate_frozen_copy(sd15_dir):
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    ref = adapters.frozen_reference(comp.unet, torch.bfloat16)
    assert ref is not comp.unet and ref.dtype == torch.bfloat16 and comp.unet.dtype == torch.float32
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in comp.unet.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), comp.unet.parameters()))


def test_bf16_frozen_reference_sees_sdxl_time_ids_exact(monkeypatch):
    """bf16 rounds 1023 to 1024 and 301 to 300: the frozen copy must get the ids the policy gets, in float32."""
    from t2i_align import references
    from t2i_align.conditioning.text import PromptEmbeds

    seen = []
    monkeypatch.setattr(references, "make_denoiser",
                        lambda net, comp: lambda noisy, t, embeds, time_ids: seen.append(time_ids) or noisy)
    reference = references._frozen_denoiser(torch.nn.Linear(2, 2).to(torch.bfloat16), None)
    ids = torch.tensor([[1023.0, 683.0, 301.0, 17.0, 1024.0, 1024.0]])
    reference(torch.zeros(1, 4, 2, 2), torch.tensor([5]), PromptEmbeds(torch.zeros(1, 3, 8), torch.zeros(1, 8)), ids)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == ids.tolist()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_build_pipeline_samples(family, sd15_dir, sdxl_dir):
    folder = {"sd15": sd15_dir, "sdxl": sdxl_dir}[family]
    pipe = models.build_pipeline(models.load_components(ModelConfig(pretrained=str(folder))))
    assert type(pipe).__name__ == models.FAMILIES[family].sampling_pipeline
    assert type(pipe.scheduler).__name__ != "DDPMScheduler", "sampling uses the folder's own scheduler"
    images = pipe(["a cat"], num_inference_steps=2, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_export_with_bf16_frozen_parts_loads_and_samples_in_plain_diffusers(family, sd15_dir, sdxl_dir, tmp_path):
    """Text encoders train in bf16 beside the fp32 UNet; transformers 5 loads each part in its saved dtype, so a
    mixed folder failed at the first prompt ("mat1 and mat2 must have the same dtype")."""
    from diffusers import DiffusionPipeline

    from t2i_align.checkpoints import export_final

    folder = {"sd15": sd15_dir, "sdxl": sdxl_dir}[family]
    comp = models.load_components(ModelConfig(pretrained=str(folder), weight_dtype="bf16"))
    assert comp.text_encoders[0].dtype == torch.bfloat16
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path)
    assert comp.text_encoders[0].dtype == torch.bfloat16, "the run's own parts are cast back after saving"
    pipe = DiffusionPipeline.from_pretrained(str(final))
    dtypes = {name: next(m.parameters()).dtype for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    images = pipe(["a cat"], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    # the parts that never trained are the source's weights, not their bf16 copies (1e-3 off)
    source = DiffusionPipeline.from_pretrained(str(folder))
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if name in source.components:
            for (key, want), got in zip(source.components[name].state_dict().items(),
                                        pipe.components[name].state_dict().values()):
                assert torch.equal(want, got), (name, key)


def test_a_full_export_whose_source_is_gone_or_changed_keeps_the_parts_it_used_with_a_warning(sd15_dir, tmp_path,
                                                                                          caplog):
    import shutil

    from t2i_align.checkpoints import export_final

    source = shutil.copytree(sd15_dir, tmp_path / "moved")
    comp = models.load_components(ModelConfig(pretrained=str(source), weight_dtype="bf16"))
    shutil.rmtree(source / "text_encoder")  # moved or unmounted during a days-long run
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "run")
    assert (final / "text_encoder" / "model.safetensors").is_file()
    assert "text_encoder could not be read again" in caplog.text and "rounded to model.weight_dtype" in caplog.text
    from diffusers import AutoencoderKL  # a VAE downloaded again, other weights: the one the run used is kept

    vae = AutoencoderKL.from_pretrained(str(source / "vae"))
    torch.nn.init.normal_(vae.decoder.conv_out.weight)
    vae.save_pretrained(str(source / "vae"))
    caplog.clear()
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "run2")
    assert "vae could not be read again" in caplog.text and "not the weight the run used" in caplog.text
    exported = AutoencoderKL.from_pretrained(str(final / "vae")).decoder.conv_out.weight
    assert torch.equal(exported, comp.vae.decoder.conv_out.weight.float())


def test_a_variant_only_folder_loads_for_training_and_sampling_in_one_dtype(tmp_path):
    """A folder saved with variant="fp16" only failed with "no file named model.safetensors ... in <folder>"
    unless model.variant was set; sampling had no way to set it. The pipeline comes up in one dtype, except
    SDXL's fp16-overflowing VAE, and without the SD1.5 safety checker."""
    from helpers import tiny_sdxl_pipeline

    from t2i_align.sampling import generate, load_pipeline

    folder = tmp_path / "sdxl16"
    tiny_sdxl_pipeline().save_pretrained(str(folder), variant="fp16")
    assert models.weights_variant(folder) == "fp16" and models.weights_variant(folder, "fp16") == "fp16"
    comp = models.load_components(ModelConfig(pretrained=str(folder)))
    assert comp.unet.dtype == torch.float32
    pipe = load_pipeline(folder, dtype="fp16")
    dtypes = {name: m.dtype for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert dtypes.pop("vae") == torch.float32 and set(dtypes.values()) == {torch.float16}, dtypes
    bf16 = load_pipeline(folder, dtype="bf16")
    assert bf16.vae.dtype == torch.float32  # as training keeps it (it decoded in bf16 here, in fp32 there)
    images = generate(bf16, ["a cat"], [0], num_inference_steps=2, height=16, width=16)
    assert images.images.shape == (1, 3, 16, 16) and torch.isfinite(images.images).all()
    for part in folder.glob("*/*.fp16.safetensors"):
        part.rename(part.with_name(part.name.replace(".fp16.", ".bf16.")))
    (folder / "unet" / "diffusion_pytorch_model.fp32.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several variants.*bf16, fp32.*model.variant='bf16'"):
        models.load_components(ModelConfig(pretrained=str(folder)))
    with pytest.raises(ModelLoadError, match="several variants.*choose one with --variant bf16$"):
        load_pipeline(folder)
    assert load_pipeline(folder, variant="bf16").unet.dtype == torch.float32  # sample/'s --variant


def test_a_variant_unet_beside_plain_parts_loads_as_in_diffusers(sd15_dir, tmp_path):
    """The variant is chosen from unet/; every part was then asked for it, and a folder with an fp16 UNet beside
    plain text encoders and VAE (loaded by diffusers, part by part) failed with "the folder may be incomplete"."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "mixed"
    shutil.copytree(sd15_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(str(folder / "unet"), variant="fp16")
    comp = models.load_components(ModelConfig(pretrained=str(folder)))
    assert all(torch.equal(a, b) for a, b in zip(comp.unet.state_dict().values(), unet.state_dict().values()))


def test_sampling_leaves_out_the_safety_checker(sd15_dir, tmp_path):
    """SD1.5 folders list a safety checker (1.2 GB): not loaded, and a folder that left it out still loads."""
    from t2i_align.sampling import load_pipeline

    index = json.loads((sd15_dir / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    folder = tmp_path / "with_checker"
    import shutil

    shutil.copytree(sd15_dir, folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(folder)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32


def test_latent_scaling_with_and_without_a_shift():
    from types import SimpleNamespace

    shifted = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=0.1))
    assert scale_latents(shifted, torch.tensor([1.1, -0.9])).tolist() == pytest.approx([0.5, -0.5])
    assert unscale_latents(shifted, torch.tensor([0.5, -0.5])).tolist() == pytest.approx([1.1, -0.9])
    plain = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215, shift_factor=None))
    assert scale_latents(plain, torch.tensor([2.0])).tolist() == pytest.approx([0.3643])
    # per-channel statistics, which diffusers' SDXL pipeline decodes with (latents * std / scaling + mean) when a
    # VAE config sets them: ignored before, so such a model trained in other latents than it samples in
    normed = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=None, latents_mean=[1.0, -1.0],
                                                    latents_std=[2.0, 4.0]))
    z = torch.tensor([3.0, 7.0]).view(1, 2, 1, 1)
    assert scale_latents(normed, z).flatten().tolist() == pytest.approx([0.5, 1.0])  # (3-1)*.5/2, (7+1)*.5/4
    assert unscale_latents(normed, torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)).flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("names, variant", [
    (["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"], None),
    (["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json"], None),
    (["diffusion_pytorch_model.fp16.bin"], "fp16"),
    (["diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "diffusion_pytorch_model.fp16-00002-of-00002"
      ".safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json"], "fp16"),
    (["diffusion_pytorch_model-00001-of-00002.bf16.safetensors", "diffusion_pytorch_model.safetensors.bf16.index.json"],
     "bf16"),
    (["config.json"], None),
])
def test_weights_variant_reads_diffusers_file_names(names, variant, tmp_path):
    """diffusers' variant names, sharded and legacy ones included (a shard's number is not a variant)."""
    (tmp_path / "unet").mkdir()
    for name in names:
        (tmp_path / "unet" / name).write_bytes(b"")
    assert models.weights_variant(tmp_path) == variant


def test_a_variant_the_folder_lacks_is_named_with_what_it_holds(tmp_path):
    (tmp_path / "unet").mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (tmp_path / "unet" / name).write_bytes(b"")
    assert models.weights_variant(tmp_path, "fp16") == "fp16"
    with pytest.raises(ModelLoadError, match=r"model.variant='bf16'.*holds: plain \(model.variant=null\), fp16 \(ch"):
        models.weights_variant(tmp_path, "bf16")
    # sample/'s --variant: a folder without it loads its plain weights (a tuned export beside a base); with neither,
    # the flag is named
    assert models.weights_variant(tmp_path, "bf16", "--variant", fallback=True) is None
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"^--variant bf16, but .* holds no bf16 weights; it holds: fp16 \(choose"):
        models.weights_variant(tmp_path, "bf16", "--variant", fallback=True)


def test_full_exports_keep_the_sources_safety_checker(sd15_dir, tmp_path, caplog):
    """Training and sampling leave SD1.5's safety checker out; a full export carries the source's over, so a plain
    load of it filters as the source did (it was dropped without a word)."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from t2i_align.checkpoints import export_final

    source = tmp_path / "source"
    shutil.copytree(sd15_dir, source)
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=16)
    # as a download holds it: fp16 weights, and a pickle beside them (copied whole into every export before)
    StableDiffusionSafetyChecker(config).half().save_pretrained(source / "safety_checker")
    (source / "safety_checker" / "pytorch_model.bin").write_bytes(b"a pickle")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(source / "feature_extractor")
    index = json.loads((source / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (source / "model_index.json").write_text(json.dumps(index))
    comp = models.load_components(ModelConfig(pretrained=str(source)))
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "run")
    pipe = StableDiffusionPipeline.from_pretrained(str(final))
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.config.requires_safety_checker
    assert sorted(f.name for f in (final / "safety_checker").iterdir()) == ["config.json", "model.safetensors"]
    assert pipe.safety_checker.dtype == torch.float32
    # in the official key layout, which transformers 4 reads too (transformers 5 writes vision_model.embeddings...)
    from safetensors import safe_open

    with safe_open(str(final / "safety_checker" / "model.safetensors"), "pt") as f:
        assert "vision_model.vision_model.embeddings.class_embedding" in f.keys()
    original = StableDiffusionSafetyChecker.from_pretrained(str(source / "safety_checker")).float().state_dict()
    assert all(torch.equal(v, original[k]) for k, v in pipe.safety_checker.state_dict().items())
    out = pipe(["a cat"], num_inference_steps=2, height=16, width=16, output_type="np")
    assert out.nsfw_content_detected is not None and len(out.nsfw_content_detected) == 1
    plain = export_final(models.build_pipeline(models.load_components(ModelConfig(pretrained=str(sd15_dir)))),
                         comp.unet, False, tmp_path / "plain")
    assert not (plain / "safety_checker").exists(), "a source without one gives an export without one"
    # weights missing from its file (a flat one under transformers 4): not carried over as a random checker
    from safetensors.torch import load_file, save_file

    checker_file = source / "safety_checker" / "model.safetensors"
    tensors = load_file(str(checker_file))
    save_file({k: v for k, v in tensors.items() if k != "visual_projection.weight"}, str(checker_file))
    caplog.clear()
    lacking = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "lacking")
    assert "weights are missing from its files" in caplog.text and not (lacking / "safety_checker").exists()
    # a git-lfs pointer in its place (pulled without it): the export kept, without one, with a warning (it was
    # deleted whole at the end of training by the checker's load error)
    (source / "safety_checker" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with caplog.at_level(logging.WARNING, logger="t2i_align.full_export"):
        kept = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "lfs")
    assert "lists a safety checker that could not be read" in caplog.text and f"saved to {kept} has none" in caplog.text
    assert (kept / "unet").is_dir() and not (kept / "safety_checker").exists()
    assert StableDiffusionPipeline.from_pretrained(str(kept)).safety_checker is None


def test_a_lycoris_file_is_named_as_such(sd15_dir, tmp_path):
    """A kohya-style LoHa: diffusers' error put the unconverted keys after an empty first line, and the message
    kept only that line ("...not been correctly renamed: ") and blamed another model family."""
    from safetensors.torch import save_file

    from t2i_align.sampling import load_pipeline

    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{layer}.hada_w1_a": torch.zeros(4, 2), f"{layer}.hada_w1_b": torch.zeros(2, 4),
               f"{layer}.alpha": torch.tensor(2.0)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ModelLoadError, match="are a LyCORIS file"):
        load_pipeline(sd15_dir, lora=tmp_path / "loha.safetensors")


def test_a_lora_of_another_family_is_refused_in_one_line(sd15_dir, sdxl_dir, tmp_path):
    """It was diffusers' whole state-dict report (2 KB of escaped text) inside the error line, and diffusers logged
    that report before it (a line per mismatched weight)."""
    from t2i_align.checkpoints import export_final
    from t2i_align.sampling import load_pipeline

    comp = models.load_components(ModelConfig(pretrained=str(sdxl_dir)))
    adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=4))
    final = export_final(models.build_pipeline(comp), comp.unet, True, tmp_path)
    logged = []  # on diffusers' logger itself: it does not propagate to pytest's handlers
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("diffusers.loaders.peft").addHandler(handler)
    try:
        with pytest.raises(ModelLoadError) as info:
            load_pipeline(sd15_dir, lora=final)
    finally:
        logging.getLogger("diffusers.loaders.peft").removeHandler(handler)
    message = str(info.value)
    assert "trained on another model" in message and "size mismatch" in message
    assert "\n" not in message and len(message) < 700
    assert not [m for m in logged if "was unsuccessful" in m]


def test_a_lora_whose_unet_keys_partly_match_no_layer_is_refused(sd15_dir, tmp_path):
    """peft loaded the keys naming a UNet layer and dropped the rest with a log line (diffusers' "unexpected keys"):
    samples of part of an adapter (e.g. one for another base model whose names partly coincide). Keys of no part of
    the pipeline were dropped without a word, and a file none of whose keys matched was diffusers' error cut at 300
    characters inside its list of names. Text-encoder keys still load."""
    from safetensors.torch import load_file, save_file

    from t2i_align.sampling import load_pipeline

    final = export_random_lora(sd15_dir, tmp_path / "run")
    state = load_file(str(final / "pytorch_lora_weights.safetensors"))

    def write(folder, tensors):
        (tmp_path / folder).mkdir()
        save_file(tensors, str(tmp_path / folder / "pytorch_lora_weights.safetensors"))
        return tmp_path / folder

    moved = {k.replace("down_blocks.1.", "down_blocks.7."): v for k, v in state.items()}  # up_blocks' keys stay
    first = next(k for k in moved if "down_blocks.7." in k)
    count = sum("down_blocks.7." in k for k in moved)
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(sd15_dir, lora=write("partial", moved))
    message = str(info.value)
    assert f"{count} of its {len(state)} LoRA keys" in message and f"(e.g. {first})" in message
    assert "another base model" in message and str(tmp_path / "partial") in message and "\n" not in message
    stray = {**state, "unet_.mid_block.lora_A.weight": torch.zeros(4, 8)}  # diffusers drops it silently
    with pytest.raises(ModelLoadError, match=r"1 of its \d+ LoRA keys .*unet_\.mid_block"):
        load_pipeline(sd15_dir, lora=write("stray", stray))
    none = {k.replace("unet.", "unet.x_"): v for k, v in state.items()}
    with pytest.raises(ModelLoadError, match=f"{len(state)} of its {len(state)} LoRA keys .*match no UNet layer"):
        load_pipeline(sd15_dir, lora=write("none", none))
    layer = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    with_te = {**state, f"{layer}.lora_A.weight": torch.randn(4, 32), f"{layer}.lora_B.weight": torch.randn(32, 4)}
    pipe = load_pipeline(sd15_dir, lora=write("te", with_te))
    assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())
    assert sum("lora_A" in n for n, _ in pipe.unet.named_parameters()) == len(state) // 2


def test_a_unet_only_lora_loads_without_diffusers_note_on_the_text_encoder(sd15_dir, tmp_path):
    """Every LoRA sampling printed diffusers' "No LoRA keys associated to CLIPTextModel found ... safe to ignore"
    (the project's exports are UNet-only), where warnings are one line each and mean something."""
    import logging

    from t2i_align.sampling import load_pipeline

    final = export_random_lora(sd15_dir, tmp_path / "run")
    seen, handler, log = [], logging.Handler(), logging.getLogger("diffusers.loaders.lora_base")
    handler.emit = lambda record: seen.append(record.getMessage())  # after the logger's filters, as printed
    log.addHandler(handler)
    try:
        load_pipeline(sd15_dir, lora=final)
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "No LoRA keys" in m]


def test_a_lora_trained_with_another_vae_records_it_and_samples_with_it_when_asked(sd15_dir, tmp_path, capsys):
    """model.vae was not recorded by a LoRA export and sampling had no way to use it: the exported model decoded
    with the folder's VAE, unlike training's galleries. Now the record names it, sampling says so, and --vae (the
    `vae` of load_pipeline) decodes with it. A variant-only VAE folder loads (it was an OSError traceback)."""
    from diffusers import AutoencoderKL

    from t2i_align.checkpoints import export_final
    from t2i_align.sampling import load_pipeline

    other = AutoencoderKL.from_config(AutoencoderKL.load_config(sd15_dir, subfolder="vae"))
    torch.nn.init.normal_(other.decoder.conv_out.weight, 0, 0.5)
    other.save_pretrained(tmp_path / "vae-ft", variant="fp16")
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir), vae=str(tmp_path / "vae-ft")))
    adapters.add_lora(comp.unet, LoraConfig(enabled=True, rank=2))
    assert comp.vae_dir == tmp_path / "vae-ft"  # as it loaded: the export does not resolve (a hub id) again
    final = export_final(models.build_pipeline(comp), comp.unet, True, tmp_path / "run", base_model=str(sd15_dir),
                         vae="my-vae", vae_dir=comp.vae_dir)
    record = json.loads((final / "t2i_align_base_model.json").read_text())
    assert (record["vae"], record["vae_given"]) == (str((tmp_path / "vae-ft").resolve()), "my-vae")
    plain = load_pipeline(sd15_dir, lora=final)
    assert f"was trained with model.vae={(tmp_path / 'vae-ft').resolve()}" in capsys.readouterr().err
    assert not torch.equal(plain.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    with_vae = load_pipeline(sd15_dir, lora=final, vae=tmp_path / "vae-ft")
    assert torch.equal(with_vae.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    assert "was trained with" not in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="--vae=.*could not load a VAE from"):
        load_pipeline(sd15_dir, vae=tmp_path / "run")  # a folder, but no VAE
    from t2i_align.merge import merge_lora  # merge_lora.py --vae: the merged folder decodes as training did

    merged = merge_lora(sd15_dir, final, tmp_path / "merged", vae=tmp_path / "vae-ft")
    kept = AutoencoderKL.from_pretrained(merged, subfolder="vae")
    assert torch.equal(kept.decoder.conv_out.weight, other.decoder.conv_out.weight)


def _nine_channel_copy(sd15_dir, tmp_path):
    """A copy of the tiny SD1.5 folder whose UNet takes 9 channels (an inpainting model's)."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "inpaint"
    shutil.copytree(sd15_dir, folder)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"), in_channels=9)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


def test_an_inpainting_unet_is_refused_at_load(sd15_dir, tmp_path):
    """An inpainting pipeline loaded with model.family set (its error's advice) put a 9-channel UNet beside a
    4-channel VAE, which failed only at the first forward with conv_in's shape error."""
    folder = _nine_channel_copy(sd15_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="its UNet takes 9 input channels and the VAE gives 4: an inpainting"):
        models.load_components(ModelConfig(pretrained=str(folder), family="sd15"))


def test_sampling_refuses_a_unet_that_does_not_take_the_vae_latents(sd15_dir, tmp_path):
    """load_pipeline (sample/, t2i-score's generation) had no such check: a 9-channel UNet failed at the first
    denoising step with conv_in's shape error, after the pipeline and rewards had loaded."""
    from t2i_align.sampling import load_pipeline

    folder = _nine_channel_copy(sd15_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="its UNet takes 9 input channels and the VAE gives 4"):
        load_pipeline(str(folder))


def test_damaged_or_unlisted_parts_are_load_errors_and_damaged_json_is_named_before_loading(sd15_dir, tmp_path):
    """A VAE missing from model_index.json, a damaged vae or scheduler config or tokenizer file were tracebacks
    (the first naming the pipeline folder as the VAE's) that the dry run's folder checks passed."""
    import shutil

    no_vae = shutil.copytree(sd15_dir, tmp_path / "novae")
    index = json.loads((no_vae / "model_index.json").read_text())
    index.pop("vae")
    (no_vae / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model_index.json lists no vae"):
        models.load_components(ModelConfig(pretrained=str(no_vae)))
    from diffusers import AutoencoderKL, DDPMScheduler

    for part, name in (("vae", "config.json"), ("scheduler", "scheduler_config.json"),
                       ("tokenizer", "tokenizer_config.json")):
        damaged = shutil.copytree(sd15_dir, tmp_path / f"damaged-{part}")
        (damaged / part / name).write_text('{"cut": ')
        with pytest.raises(ModelLoadError, match=f"{part}/{name} is not valid JSON"):
            models.resolve_pretrained(str(damaged))  # what the dry run (and load_components first) checks
        with pytest.raises(ModelLoadError, match=f"could not (load|read the) {part}"):  # the loading itself
            if part == "tokenizer":
                models._load_part(damaged, models.read_index(damaged), part)
            else:
                cls = AutoencoderKL if part == "vae" else DDPMScheduler
                models._part_config(cls, damaged, models.read_index(damaged), part)


def test_a_scheduler_that_predicts_the_sample_is_refused_at_load(sd15_dir, tmp_path):
    """prediction_type "sample" loaded and failed at the first training step, the output folder claimed."""
    import shutil

    other = shutil.copytree(sd15_dir, tmp_path / "x0")
    config = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ModelLoadError, match="prediction_type 'sample' is not supported"):
        models.load_components(ModelConfig(pretrained=str(other)))


def test_a_vae_of_another_family_is_refused(sd15_dir, tmp_path):
    """Both families' VAEs give 4 latent channels: an SDXL VAE passed as SD1.5's model.vae trained silently."""
    import shutil

    from t2i_align.sampling import load_pipeline

    sdxl_like = shutil.copytree(sd15_dir / "vae", tmp_path / "sdxl-vae")
    config = json.loads((sdxl_like / "config.json").read_text())
    (sdxl_like / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    with pytest.raises(ModelLoadError, match="model.vae=.*scaling_factor is 0.13025, the model's own VAE's 0.18215"):
        models.load_components(ModelConfig(pretrained=str(sd15_dir), vae=str(sdxl_like)))
    with pytest.raises(ModelLoadError, match="--vae .*scaling_factor is 0.13025"):
        load_pipeline(sd15_dir, vae=sdxl_like)
    models.load_components(ModelConfig(pretrained=str(sd15_dir), vae=str(sd15_dir)))  # its own kind: fine


def test_a_bad_unet_checkpoint_is_a_load_error(sd15_dir, tmp_path):
    """A UNet folder without weights, with git-lfs pointers, a cut weights file or a damaged config.json were
    tracebacks from merge_lora.py --unet and the sample scripts (partial clones of the released DPO UNets)."""
    import shutil

    from t2i_align.unet_checkpoint import load_unet_checkpoint

    base = models.load_components(ModelConfig(pretrained=str(sd15_dir))).unet
    weights = next((sd15_dir / "unet").glob("*.safetensors")).name
    cases = {"none": (lambda f: (f / weights).unlink(), "holds no weights file"),
             "lfs": (lambda f: (f / weights).write_text("version https://git-lfs.github.com/spec/v1\n"), "git-lfs"),
             "cut": (lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:100]), "could not load its"),
             "config": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON")}
    for name, (damage, told) in cases.items():
        folder = shutil.copytree(sd15_dir / "unet", tmp_path / name / "unet")
        damage(folder)
        with pytest.raises(ModelLoadError, match=told):
            load_unet_checkpoint(folder.parent, base)


def test_a_full_export_keeps_the_sources_vocabulary_files(tmp_path):
    """transformers 5 saves a CLIPTokenizer as tokenizer.json alone; model_index.json names CLIPTokenizer, which
    transformers 4 (setup.cfg allows it) loads from vocab.json and merges.txt: the source's are carried over."""
    from t2i_align.checkpoints import export_final

    comp = models.load_components(ModelConfig(pretrained="toy"))
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path)
    source = comp.path / "tokenizer"
    # transformers 4 writes its own (vocab.json indented): the same vocabulary
    vocab = [json.loads((f / "vocab.json").read_text()) for f in (final / "tokenizer", source)]
    assert vocab[0] == vocab[1]
    merges = [(f / "tokenizer" / "merges.txt").read_text().splitlines() for f in (final, comp.path)]
    assert [m for m in merges[0] if not m.startswith("#")] == [m for m in merges[1] if not m.startswith("#")]


def test_the_vae_scale_check_reads_a_config_without_the_key_as_diffusers_does(sd15_dir, tmp_path):
    """SD1.5 folders saved by early diffusers have no scaling_factor in vae/config.json (0.18215 by default): every
    VAE, the model's own included, was refused; macOS's ._config.json copies were named damaged JSON."""
    import shutil

    old = shutil.copytree(sd15_dir, tmp_path / "old")
    config = json.loads((old / "vae" / "config.json").read_text())
    config.pop("scaling_factor", None)
    (old / "vae" / "config.json").write_text(json.dumps(config))
    (old / "unet" / "._config.json").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    models.load_components(ModelConfig(pretrained=str(old), vae=str(sd15_dir)))


def test_a_lora_folder_names_its_weights_file_for_diffusers(tmp_path):
    """diffusers before 0.40 (the one transformers 4 resolves to) refused a LoRA folder without `weight_name`
    under HF_HUB_OFFLINE: "When using the offline mode, you must specify a `weight_name`"."""
    from t2i_align.model_folders import _weights_file

    ppd = tmp_path / "ppd"
    ppd.mkdir()
    for name in ("user_branch.safetensors", "pytorch_lora_weights.safetensors", "user_table.safetensors"):
        (ppd / name).write_bytes(b"")
    assert _weights_file(ppd) == (str(ppd), {"weight_name": "pytorch_lora_weights.safetensors"})
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "my_lora.safetensors").write_bytes(b"")
    (tmp_path / "one" / "._my_lora.safetensors").write_bytes(b"")  # a macOS copy's shadow file
    one = tmp_path / "one"
    assert _weights_file(one) == (str(one), {"weight_name": "my_lora.safetensors"})
    (one / "other.safetensors").write_bytes(b"")
    assert _weights_file(one) == (str(one), {})  # diffusers says which file it wants
    assert _weights_file(one / "other.safetensors") == (str(one), {"weight_name": "other.safetensors"})


def test_text_encoders_are_written_in_the_key_layout_transformers_4_reads_and_read_checked(sd15_dir, tmp_path,
                                                                                           monkeypatch):
    """transformers 5 saves a CLIPTextModel as embeddings.* (no text_model. prefix); transformers 4 loaded such a
    file, the shipped toy text encoder included, as an all-random encoder with a warning only: the toy world and
    every export were silently broken there. Exports are written in the official layout, which both read; a folder
    in the other layout, or missing weights, is refused instead of loaded as random weights."""
    import shutil

    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from t2i_align.checkpoints import export_final
    from t2i_align.sampling import load_pipeline
    from t2i_align.toy.assets import pipeline_dir
    from t2i_align.weight_files import write_keys_as_before

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return list(f.keys())

    assert all(k.startswith("text_model.") for k in keys(pipeline_dir() / "text_encoder"))  # shipped
    comp = models.load_components(ModelConfig(pretrained=str(sd15_dir)))
    final = export_final(models.build_pipeline(comp), comp.unet, False, tmp_path / "run")
    assert all(k.startswith("text_model.") for k in keys(final / "text_encoder"))
    exported = models.load_components(ModelConfig(pretrained=str(final))).text_encoders[0].state_dict()
    assert all(torch.equal(v, comp.text_encoders[0].state_dict()[k]) for k, v in exported.items())
    flat = shutil.copytree(sd15_dir, tmp_path / "flat")  # as transformers 5 saved it
    if int(transformers.__version__.split(".")[0]) < 5:  # the tiny folder was saved in the official layout
        pytest.skip("transformers 4 saves the official layout: the rest needs a folder transformers 5 saved")
    assert any(not k.startswith("text_model.") for k in keys(flat / "text_encoder"))
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    with pytest.raises(ModelLoadError, match="saved by transformers 5, whose text-encoder keys transformers 4.57.6"):
        load_pipeline(flat)
    write_keys_as_before(flat / "text_encoder")  # the fix the message gives
    load_pipeline(flat)
    monkeypatch.undo()
    tensors = load_file(str(flat / "text_encoder" / "model.safetensors"))
    tensors.pop("text_model.final_layer_norm.weight")
    save_file(tensors, str(flat / "text_encoder" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="1 weights are missing from its files .*final_layer_norm.weight"):
        models.load_components(ModelConfig(pretrained=str(flat)))


def test_sharded_text_encoders_and_their_variant_indexes_are_rewritten_together(tmp_path):
    """Shards got the official keys but an fp16 variant's index kept transformers 5's: transformers 4 then found
    every weight missing and loaded a random encoder."""
    import shutil

    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_align.weight_files import write_keys_as_before

    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2))
    model.save_pretrained(tmp_path / "te", max_shard_size="20KB")
    shards = sorted((tmp_path / "te").glob("model-*.safetensors"))
    assert len(shards) > 1
    te = tmp_path / "te"
    shutil.copy(te / "model.safetensors.index.json", te / "model.safetensors.index.fp16.json")
    write_keys_as_before(tmp_path / "te")
    for index in ("model.safetensors.index.json", "model.safetensors.index.fp16.json"):
        assert all(k.startswith("text_model.") for k in json.loads((tmp_path / "te" / index).read_text())["weight_map"])
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert all(k.startswith("text_model.") for k in f.keys())
    again, info = CLIPTextModel.from_pretrained(str(te), output_loading_info=True)
    same = all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert not info["missing_keys"] and same


@pytest.mark.parametrize("entry", [["transformers", "AutoModel"], ["evil", "EvilModel"]])
def test_a_folder_naming_a_custom_or_auto_class_is_refused_before_any_code_runs(tmp_path, entry):
    """An Auto class with an auto_map in its config.json made transformers ask "run the custom code?", and a "y"
    ran the folder's .py during training's load; an unknown library was a raw ModuleNotFoundError."""
    import json

    from t2i_align.config import ModelConfig
    from t2i_align.models import ModelLoadError, load_components

    folder = save_tiny_pipeline("sd15", tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"names {entry[0]}.{entry[1]} for text_encoder: only diffusers' and "
                                             "transformers' own classes"):
        load_components(ModelConfig(pretrained=str(folder)))
