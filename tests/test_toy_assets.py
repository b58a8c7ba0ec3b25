"""The shipped toy assets: integrity, plain-diffusers loading, the base model's judge score, pairs (the demo is run
by test_toy_demo.py)."""
import io
import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from t2i_align.sampling import load_pipeline
from t2i_align.toy.assets import ToyAssetError, clip_dir, pipeline_dir, read_manifest, verify_assets
from t2i_align.toy.evaluate import evaluate, prompt_set
from t2i_align.toy.pairs import export_pairs


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy")


def test_shipped_assets_match_their_manifest_and_stay_small():
    files = verify_assets()
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in files
    total = sum((pipeline_dir().parent / f).stat().st_size for f in files)
    assert total <= 36 * 2 ** 20, total  # pipeline 17 MB, toy CLIP and toy Denscore 8 MB each


def test_damaged_asset_fails_with_rebuild_hint(tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(pipeline_dir().parent, root)
    target = root / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ToyAssetError, match=r"hash mismatch: pipeline/unet/.*python -m t2i_align.toy build"):
        verify_assets(root)
    (root / "manifest.json").unlink()
    with pytest.raises(ToyAssetError, match="python -m t2i_align.toy build"):
        verify_assets(root)


def test_plain_diffusers_loads_the_toy_pipeline_and_makes_an_image():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir()))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle at the top left on a white background", num_inference_steps=10,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_toy_clip_loads_with_open_clip_and_prefers_the_true_caption():
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir()}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir()}")
    from t2i_align.toy.build import CLIP_MEAN, CLIP_STD
    from t2i_align.toy.scenes import Scene, render, short_caption

    scenes = [Scene("red", "circle", "large", "top left", "white"), Scene("blue", "square", "small",
                                                                            "bottom right", "black")]
    pixels = torch.tensor(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer([short_caption(s) for s in scenes]), normalize=True)
    sims = img @ txt.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]


@pytest.mark.slow  # 32 s: 120 held-out samples; the shipped weights it judges are pinned by the manifest's hashes
def test_base_model_leaves_room_for_tuning_but_learned_colour(toy_pipe):
    result = evaluate(toy_pipe, prompt_set("heldout"), seeds_per_prompt=2).summary
    assert 0.35 <= result["overall"]["mean"] <= 0.80, result["overall"]
    assert result["per_attribute"]["color"]["mean"] >= 0.7, result["per_attribute"]


def test_pairs_export_has_the_pickapic_schema(toy_pipe, tmp_path):
    counts = export_pairs(toy_pipe, prompt_set("train")[:3], tmp_path, images_per_prompt=4)
    table = pq.read_table(tmp_path / "pairs.parquet")
    assert tuple(table.column_names) == ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id",
                                         "are_different", "has_label", "model_0", "model_1", "ranking_id")
    assert table.num_rows == counts["pairs"] == 6
    rows = table.to_pylist()
    for row in rows:
        assert row["label_0"] in (0.0, 0.5, 1.0) and row["label_1"] == 1.0 - row["label_0"]
        assert Image.open(io.BytesIO(row["jpg_0"])).size == (32, 32)
        assert row["has_label"] is True
    assert counts["ties"] == sum(r["label_0"] == 0.5 for r in rows)
    assert json.loads((tmp_path / "pairs.json").read_text())["pairs"] == 6


def test_pairs_need_two_images_per_prompt(toy_pipe, tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        export_pairs(toy_pipe, prompt_set("train")[:1], tmp_path, images_per_prompt=1)


def test_where_prints_existing_paths():
    out = subprocess.run([sys.executable, "-m", "t2i_align.toy", "where"], capture_output=True, text=True,
                         check=True).stdout
    paths = json.loads(out)
    assert (pipeline_dir() / "model_index.json").is_file() and paths["pipeline"] == str(pipeline_dir())
    assert paths["toy_clip"] == str(clip_dir()) and Path(paths["toy_denscore"]).is_dir()


def test_manifest_records_the_build_settings():
    manifest = read_manifest()
    assert manifest["seed"] == 0 and manifest["budget"]["label_noise"] > 0
