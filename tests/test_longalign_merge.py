"""Merging a stage-1 LoRA into its base (LongAlign's `collapse_lora` before stage 2): the merged pipeline's UNet
computes what base + LoRA computes, and it keeps the LoRA's text encoding."""
import warnings

import pytest
import torch

from helpers import export_random_lora, one_torch_thread, save_tiny_pipeline  # noqa: F401  (fixture)
from t2i_align.errors import UserError


def test_merged_unet_equals_base_plus_lora_and_keeps_the_text_encoding(tmp_path):
    from t2i_align.merge import merge_lora
    from t2i_align.sampling import check_weights, load_pipeline, pipeline_components

    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    final = export_random_lora(model, tmp_path / "stage1", "model.text_encoding.kind=segments",
                               "model.text_encoding.token_budget=100")
    merged = merge_lora(model, final, tmp_path / "merged")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    e = torch.randn(2, 100, 32)
    outputs = {}
    for name, pipe in (("lora", load_pipeline(model, lora=final)), ("merged", load_pipeline(merged)),
                       ("base", load_pipeline(model))):
        with torch.no_grad():
            outputs[name] = pipe.unet(x, t, e).sample
    assert torch.allclose(outputs["merged"], outputs["lora"], atol=1e-5)
    assert not torch.allclose(outputs["base"], outputs["lora"], atol=1e-3)  # the LoRA did change the UNet
    encoding = pipeline_components(load_pipeline(merged)).text_encoding
    assert (encoding.kind, encoding.token_budget) == ("segments", 100)
    with pytest.raises(UserError, match="exists and --out .* would replace it.*--overwrite"):
        merge_lora(model, final, merged)
    # --overwrite replaced any folder whole: a folder it did not write (no model_index.json) is refused
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "cat.png").write_bytes(b"png")
    with pytest.raises(UserError, match="holds files but no t2i_align_merged.json.*would delete it whole"):
        merge_lora(model, final, tmp_path / "pictures", overwrite=True)
    with pytest.raises(UserError, match="no t2i_align_merged.json"):  # a base model folder is no merge
        merge_lora(model, final, save_tiny_pipeline("sd15", tmp_path / "other"), overwrite=True)
    # nor a training run's final/: it holds an encoding record too, which was the merge's marker until session 25
    other_run = export_random_lora(model, tmp_path / "run2")
    with pytest.raises(UserError, match="no t2i_align_merged.json"):
        merge_lora(model, final, other_run, overwrite=True)
    assert (other_run / "pytorch_lora_weights.safetensors").is_file()
    assert merge_lora(model, final, merged, overwrite=True) == merged  # its own earlier output is replaced
    assert (tmp_path / "pictures" / "cat.png").read_bytes() == b"png"
    with pytest.raises(UserError, match="is the current folder, one above it"):
        merge_lora(model, final, "..", overwrite=True)
    lora_file = final / "pytorch_lora_weights.safetensors"
    for out, flag in ((final, "--lora"), (tmp_path / "stage1", "--lora"), (tmp_path, "--lora"), (model, "--model")):
        with pytest.raises(UserError, match=f"is or holds {flag}"):
            merge_lora(model, lora_file, out, overwrite=True)
    assert lora_file.is_file() and (model / "model_index.json").is_file()  # both inputs untouched
    from t2i_align.toy.assets import pipeline_dir  # --model toy: the shipped toy base is an input too

    with pytest.raises(UserError, match="is or holds --model"):
        merge_lora("toy", lora_file, pipeline_dir(), overwrite=True)
    # a LoRA applied to another model folder than it trained on (stage 2's on stage 1's merge) is named
    with pytest.warns(UserWarning, match=f"was trained on {model.resolve()}, and is applied to {merged}"):
        check_weights(merged, final)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_weights(model, final)
    assert not [w for w in caught if "was trained on" in str(w.message)]
    with pytest.warns(UserWarning, match=f"is applied to {model} with --unet {merged / 'unet'}"):  # its UNet
        check_weights(model, final, unet=merged / "unet")  # is another model's (warned since session 38)


def test_the_base_model_record_matches_by_folder_or_by_a_name_that_is_no_folder(tmp_path):
    """"toy" or a hub id names the same model on every machine, though its folder differs; a local path is
    compared by the folder it resolves to."""
    from t2i_align.base_model import warn_other_base, write_base_model

    lora = tmp_path / "final"
    lora.mkdir()
    (tmp_path / "a").mkdir()
    write_base_model(lora, tmp_path / "elsewhere" / "snapshot", "org/model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_other_base("org/model", tmp_path / "snapshot", lora)  # the hub id: same model, another folder
        write_base_model(lora, tmp_path / "a", str(tmp_path / "a"))
        warn_other_base(str(tmp_path / "a"), tmp_path / "a", lora)
        (lora / "t2i_align_base_model.json").write_text('{"pretrained": null}')  # not ours: nothing to check
        warn_other_base("x", tmp_path / "a", lora)
    assert not caught
    write_base_model(lora, tmp_path / "a", str(tmp_path / "a"))
    with pytest.warns(UserWarning, match="was trained on .*a, and is applied to") as told:
        warn_other_base(str(tmp_path), tmp_path, lora)
    assert "tuned folder" not in str(told[0].message)  # said for any model once, LongAlign's hint with it
    write_base_model(tmp_path / "a", tmp_path / "base", "base")  # "a" a merge of ours: LongAlign stage 1's
    with pytest.warns(UserWarning, match="not what trained \\(it trained on a tuned folder: give that one"):
        warn_other_base(str(tmp_path), tmp_path, lora)


def test_the_base_model_record_is_compared_with_a_unet_checkpoint_given(tmp_path):
    """With --unet the adapters change the checkpoint's UNet, not the model folder's: one trained on the folder
    applied onto another UNet gave no warning, and one trained on a full export (given as --unet) warned."""
    from t2i_align.base_model import warn_other_base, write_base_model

    lora, export, release = tmp_path / "final", tmp_path / "export", tmp_path / "release"
    for folder in (lora, export / "unet", release):
        folder.mkdir(parents=True)
    for folder in (export / "unet", release):
        (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    write_base_model(lora, tmp_path / "base", str(tmp_path / "base"))
    with pytest.warns(UserWarning, match=f"is applied to .*base with --unet {release}"):
        warn_other_base(str(tmp_path / "base"), tmp_path / "base", lora, unet=release)
    write_base_model(lora, export, str(export))  # trained on a full export, given now as the UNet of a base
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_other_base(str(tmp_path / "base"), tmp_path / "base", lora, unet=export)
        warn_other_base(str(tmp_path / "base"), tmp_path / "base", lora, unet=export / "unet")
    assert not caught


def test_merging_onto_a_hub_id_fetches_only_the_pipeline_in_its_variant(tmp_path, monkeypatch):
    """merge_lora resolved a hub id once without --variant (full fp32 weights fetched) and again, to look for a
    PPD user table, as a snapshot of every .safetensors file in the repo (tens of GB for SDXL's)."""
    import diffusers
    import huggingface_hub

    from t2i_align.merge import merge_lora

    base = save_tiny_pipeline("sd15", tmp_path / "cached")
    lora = export_random_lora(base, tmp_path / "run")
    calls = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download",
                        staticmethod(lambda repo, **kw: calls.append(("pipeline", kw["variant"])) or str(base)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append(("snapshot", kw.get("allow_patterns"))) or str(base))
    monkeypatch.chdir(tmp_path)  # "org/model" is no folder here
    merge_lora("org/model", str(lora), tmp_path / "merged", variant="fp16")
    assert calls and set(calls) == {("pipeline", "fp16")}
