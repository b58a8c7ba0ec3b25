"""Latent / text-embedding cache: reuse, invalidation, atomic publication, dropout substitution, corrupt rows."""
import json

import pytest
import torch
import torch.nn.functional as F

from t2i_align.data.cache import build_or_load_cache, cache_key, collate_cached, model_identity
from t2i_align.data.pairs import PairDataset

from test_data_pairs import BLUE, GREEN, RED, image_bytes, row, write_pairs


class FakeEncoders:
    """Avg-pool 'VAE' and a fixed embedding per caption; counts calls; can fail on a given image call."""

    def __init__(self, fail_on_image_call=None):
        self.image_calls = self.prompt_calls = 0
        self.fail_on = fail_on_image_call

    def images(self, pixels):
        self.image_calls += 1
        if self.image_calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return F.avg_pool2d(pixels, 8)

    @staticmethod
    def embed(caption):
        code = float(sum(map(ord, caption)) % 97)
        return {"prompt_embeds": torch.full((3, 4), code), "pooled_prompt_embeds": torch.full((5,), -code)}

    def prompts(self, captions):
        self.prompt_calls += 1
        embeds = [self.embed(c) for c in captions]
        return {k: torch.stack([e[k] for e in embeds]) for k in embeds[0]}


@pytest.fixture
def pairs_path(tmp_path):
    colors = [RED, GREEN, BLUE]
    rows = [row(caption=f"caption {i % 4}", jpg_0=image_bytes(colors[i % 3], size=(16 + 8 * (i % 2), 16)),
                label_0=float(i % 2)) for i in range(10)]
    return write_pairs(tmp_path / "p.parquet", rows, row_group_size=4)


def build(ds, enc, root, batch_size=3, shard_size=4, **parts):
    return build_or_load_cache(ds, enc.images, enc.prompts, root, {"model": "fake", **parts},
                               batch_size=batch_size, shard_size=shard_size)


def test_second_build_loads_without_encoding_and_items_match_encoders(tmp_path, pairs_path):
    ds = PairDataset(pairs_path, resolution=16, crop="random", flip="joint", seed=2)
    enc = FakeEncoders()
    cached = build(ds, enc, tmp_path / "cache")
    calls = (enc.image_calls, enc.prompt_calls)
    assert calls == (4, 3)  # 10 pairs / 3 per batch; 4 unique captions / 3 per batch + the empty prompt
    again = build(PairDataset(pairs_path, resolution=16, crop="random", flip="joint", seed=2), enc,
                  tmp_path / "cache")
    assert (enc.image_calls, enc.prompt_calls) == calls and again.folder == cached.folder
    assert len(cached) == len(ds) == 10
    for i in range(len(ds)):
        item, ref = again[i], ds[i]  # ds is at epoch 0: the augmentation the cache froze
        assert torch.allclose(item["latents_w"], F.avg_pool2d(ref["pixels_w"][None], 8)[0])
        assert torch.allclose(item["latents_l"], F.avg_pool2d(ref["pixels_l"][None], 8)[0])
        assert torch.equal(item["prompt_embeds"], FakeEncoders.embed(ref["caption"])["prompt_embeds"])
        assert torch.equal(item["pooled_prompt_embeds"], FakeEncoders.embed(ref["caption"])["pooled_prompt_embeds"])
        for key in ("caption", "original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l", "index"):
            assert item[key] == ref[key], key
    files = {p.suffix for p in cached.folder.iterdir()}
    assert files == {".safetensors", ".json"}  # never pickle


def test_collate_cached_batches(tmp_path, pairs_path):
    cached = build(PairDataset(pairs_path, resolution=16), FakeEncoders(), tmp_path / "cache")
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=4, collate_fn=collate_cached)))
    assert batch["latents_w"].shape == (4, 3, 2, 2) and batch["prompt_embeds"].shape == (4, 3, 4)
    assert batch["pooled_prompt_embeds"].shape == (4, 5) and batch["original_size_w"].shape == (4, 2)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["skipped"] == 0 and len(batch["caption"]) == 4


def test_changed_settings_or_model_make_a_new_key(tmp_path, pairs_path):
    enc = FakeEncoders()
    first = build(PairDataset(pairs_path, resolution=16), enc, tmp_path / "cache")
    calls = enc.image_calls
    second = build(PairDataset(pairs_path, resolution=8), enc, tmp_path / "cache")
    assert second.folder != first.folder and enc.image_calls > calls
    assert second[0]["latents_w"].shape == (3, 1, 1)
    assert build(PairDataset(pairs_path, resolution=16, ties="first"), enc, tmp_path / "c").key != first.key
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"1")
    before = model_identity(model)
    weights.write_bytes(b"22")
    assert cache_key(before) != cache_key(model_identity(model))


def test_interrupted_build_leaves_no_cache_and_next_call_recomputes(tmp_path, pairs_path):
    ds = PairDataset(pairs_path, resolution=16)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(ds, FakeEncoders(fail_on_image_call=3), root)  # after one shard (4 pairs) was written
    assert not any((p / "complete.json").exists() for p in root.iterdir())
    assert list(root.iterdir()) == []  # the temporary folder is removed too
    enc = FakeEncoders()
    cached = build(ds, enc, root)
    assert enc.image_calls == 4 and len(cached) == 10
    marker = json.loads((cached.folder / "complete.json").read_text())
    assert marker["key"] == cached.key == cached.folder.name and marker["pairs"] == 10


def test_unmarked_folder_is_not_trusted(tmp_path, pairs_path):
    ds = PairDataset(pairs_path, resolution=16)
    cached = build(ds, FakeEncoders(), tmp_path / "cache")
    (cached.folder / "complete.json").unlink()
    enc = FakeEncoders()
    build(ds, enc, tmp_path / "cache")
    assert enc.image_calls == 4


def test_prompt_dropout_substitutes_the_empty_embedding(tmp_path):
    tiny = image_bytes(RED, size=(8, 8))
    path = write_pairs(tmp_path / "p.parquet", [row(caption=f"c{i}", jpg_0=tiny, jpg_1=tiny) for i in range(40)])
    ds = PairDataset(path, resolution=8, prompt_dropout=0.5, seed=4)
    cached = build(ds, FakeEncoders(), tmp_path / "cache", batch_size=16, shard_size=16)
    empty = FakeEncoders.embed("")["prompt_embeds"]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        cached.set_epoch(epoch)
        items = [cached[i] for i in range(len(cached))]
        assert [it["caption"] for it in items] == [ds[i]["caption"] for i in range(len(ds))]  # same draws
        dropped = [it for it in items if it["caption"] == ""]
        assert 5 < len(dropped) < 35
        assert all(torch.equal(it["prompt_embeds"], empty) for it in dropped)
        assert all(torch.equal(it["prompt_embeds"], FakeEncoders.embed(it["caption"])["prompt_embeds"])
                   for it in items if it["caption"])


def test_corrupt_rows_skipped_and_counted_at_caching(tmp_path):
    rows = [row(caption="ok 0"), row(caption="bad", jpg_1=b"garbage"), row(caption="ok 1")]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)
    cached = build(ds, FakeEncoders(), tmp_path / "cache")
    assert len(cached) == 2 and cached.stats.corrupt == 1 and cached.stats.used == 2
    assert [cached[i]["caption"] for i in range(2)] == ["ok 0", "ok 1"]
    assert cached.captions == ["ok 0", "ok 1"]  # no embedding computed for the corrupt row's caption


def test_cached_dataset_pickles_for_spawned_workers(tmp_path, pairs_path):
    import pickle

    cached = build(PairDataset(pairs_path, resolution=16), FakeEncoders(), tmp_path / "cache")
    first = cached[5]
    clone = pickle.loads(pickle.dumps(cached))
    assert torch.equal(clone[5]["latents_w"], first["latents_w"]) and clone[5]["caption"] == first["caption"]
