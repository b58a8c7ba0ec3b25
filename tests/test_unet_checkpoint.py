"""A UNet-only checkpoint merged into its base pipeline (`train/merge_lora.py --unet`): the released full
fine-tunes hold unet/ alone; the result is a whole folder with the checkpoint's UNet and the base's other parts."""
import json
import shutil
import warnings

import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401  (fixture)
from t2i_align.models import ModelLoadError


def _state(folder, part):
    """The part's weights by name, text encoders' in one key layout (exports write the official
    text_model.embeddings..., transformers 5 saves embeddings...)."""
    from safetensors.torch import load_file

    tensors = load_file(str(next((folder / part).glob("*.safetensors"))))
    return {k.removeprefix("text_model.") if part.startswith("text_encoder") else k: v for k, v in tensors.items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("unets")
    return save_tiny_pipeline("sd15", root / "base", seed=0), save_tiny_pipeline("sd15", root / "tuned", seed=1)


@pytest.mark.parametrize("given", ["root", "unet"])
def test_the_checkpoints_unet_joins_the_bases_other_parts(folders, tmp_path, given):
    from t2i_align.merge import merge_lora

    base, tuned = folders
    checkpoint = tuned if given == "root" else tuned / "unet"
    merged = merge_lora(base, None, tmp_path / "merged", unet=checkpoint)
    assert _equal(_state(merged, "unet"), _state(tuned, "unet"))
    assert not _equal(_state(merged, "unet"), _state(base, "unet"))
    assert _equal(_state(merged, "text_encoder"), _state(base, "text_encoder"))
    assert not _equal(_state(merged, "text_encoder"), _state(tuned, "text_encoder"))  # the seeds differ there too


@pytest.mark.parametrize("given", ["root", "unet"])
def test_the_checkpoints_recorded_text_encoding_goes_into_the_merge(folders, tmp_path, given):
    """A full export of ours tuned in segments, given as --unet: its record (beside unet/) was ignored, and the
    merged folder sampled in clip77, an encoding the UNet never learned."""
    from t2i_align.conditioning.text import read_text_encoding, write_text_encoding
    from t2i_align.merge import merge_lora

    base, tuned = folders
    export = tmp_path / "export"
    shutil.copytree(tuned, export)
    write_text_encoding(export, "segments", 240)
    merged = merge_lora(base, None, tmp_path / "merged", unet=export if given == "root" else export / "unet")
    assert read_text_encoding(merged).kind == "segments"
    with pytest.raises(ModelLoadError, match="tuned with text encoding 'segments'"):
        merge_lora(base, None, tmp_path / "other", "clip77", unet=export)


def test_a_lora_merges_onto_the_checkpoints_unet(folders, tmp_path):
    from helpers import export_random_lora

    from t2i_align.merge import merge_lora
    from t2i_align.sampling import load_pipeline

    base, tuned = folders
    lora = export_random_lora(base, tmp_path / "lora")
    merged = merge_lora(base, lora, tmp_path / "merged", unet=tuned / "unet")
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LoRA trained on `base`, applied on `tuned` here on purpose
        expected_pipe = load_pipeline(tuned, lora=lora)
    with torch.no_grad():
        got = load_pipeline(merged).unet(x, t, e).sample
        expected = expected_pipe.unet(x, t, e).sample
        plain = load_pipeline(tuned).unet(x, t, e).sample
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


def test_a_checkpoint_of_another_family_or_none_at_all_is_refused(folders, tmp_path):
    from t2i_align.merge import merge_lora

    base, _ = folders
    sdxl = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    with pytest.raises(ModelLoadError, match="does not fit the base model.*cross_attention_dim"):
        merge_lora(base, None, tmp_path / "out", unet=sdxl)
    with pytest.raises(ModelLoadError, match="no UNet there"):
        merge_lora(base, None, tmp_path / "out", unet=tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        merge_lora(base, None, tmp_path / "out", unet=tmp_path / "typo")
    with pytest.raises(ModelLoadError, match="give --lora, --unet or both"):
        merge_lora(base, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_that_would_replace_the_checkpoints_unet_is_refused(folders, tmp_path):
    """Given the checkpoint's root, its unet/ is what is read: --out there (or at the root) would delete it."""

    from t2i_align.errors import UserError
    from t2i_align.merge import merge_lora

    base, tuned = folders
    shutil.copytree(tuned / "unet", tmp_path / "ckpt" / "unet")
    for out in (tmp_path / "ckpt" / "unet", tmp_path / "ckpt"):
        with pytest.raises(UserError, match="is or holds --unet"):
            merge_lora(base, None, out, unet=tmp_path / "ckpt", overwrite=True)
    assert _equal(_state(tmp_path / "ckpt", "unet"), _state(tuned, "unet"))


def test_the_interface_is_checked_and_the_inside_is_the_checkpoints_own(folders, tmp_path):
    """Another head split (as a distilled UNet's other blocks) fits; a guidance embedding (LCM's
    time_cond_proj_dim) changes what the UNet takes: refused."""
    from helpers import _tiny_unet

    from t2i_align.sampling import load_pipeline

    base, _ = folders
    _tiny_unet(3, attention_head_dim=(4, 8)).save_pretrained(str(tmp_path / "heads"))
    pipe = load_pipeline(base, unet=tmp_path / "heads")
    assert list(pipe.unet.config.attention_head_dim) == [4, 8]
    _tiny_unet(3, time_cond_proj_dim=16).save_pretrained(str(tmp_path / "lcm"))
    with pytest.raises(ModelLoadError, match="time_cond_proj_dim 16 \\(base: None\\)"):
        load_pipeline(base, unet=tmp_path / "lcm")


def test_the_command_line_prints_what_it_merged(folders, tmp_path, capsys):
    import importlib.util

    from test_user_errors import REPO_ROOT

    spec = importlib.util.spec_from_file_location("merge_cli", REPO_ROOT / "train" / "merge_lora.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    base, tuned = folders
    out = tmp_path / "dpo-sd15"
    assert cli.main(["--model", str(base), "--unet", str(tuned), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"merged": str(out), "model": str(base), "lora": None,
                                                   "unet": str(tuned)}
    assert (out / "model_index.json").is_file() and _equal(_state(out, "unet"), _state(tuned, "unet"))
    assert cli.main(["--model", str(base), "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"error: nothing to merge: --model {base} is a whole pipeline, used as it is "
                                       f"(sample/generate.py --model {base}); give --lora, --unet or both to merge "
                                       "weights into a base\n")  # a full fine-tune's final/ went round in a circle
    # a base holding two variants: the error names --variant, which the command did not have until session 22
    two = tmp_path / "two-variants"
    shutil.copytree(base, two)
    weights = two / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, weights.with_name("diffusion_pytorch_model.bf16.safetensors"))
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert cli.main(["--model", str(two), "--unet", str(tuned), "--out", str(tmp_path / "v")]) == 2
    assert "choose one with --variant" in capsys.readouterr().err
    assert cli.main(["--model", str(two), "--unet", str(tuned), "--out", str(tmp_path / "v"), "--variant", "fp16"]) == 0
    assert _equal(_state(tmp_path / "v", "unet"), _state(tuned, "unet"))


def test_a_unet_only_checkpoint_given_as_a_model_names_the_merge(folders, tmp_path):
    """model.pretrained / --model at a UNet-only release said only "not a diffusers pipeline folder"."""
    from t2i_align.model_folders import ModelLoadError, read_index

    shutil.copytree(folders[1] / "unet", tmp_path / "ckpt" / "unet")
    for given in (tmp_path / "ckpt", tmp_path / "ckpt" / "unet"):
        with pytest.raises(ModelLoadError, match=f"holds a UNet only: merge it into its base model first, python "
                                                 f"train/merge_lora.py --model BASE --unet {given} --out DIR"):
            read_index(given)
    # a whole pipeline's unet/ (or its weights file): the pipeline is meant, not a merge of it into itself
    with pytest.raises(ModelLoadError, match=f"it is the unet/ of the pipeline folder {folders[1]}: give that"):
        read_index(folders[1] / "unet")
