"""Latent / text-embedding cache: reuse, invalidation, atomic publication, dropout substitution, corrupt rows."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers import thread_team
from t2i_align.data.cache import build_or_load_cache, cache_key, collate_cached, model_identity
from t2i_align.data.pairs import PairDataset
from t2i_align.errors import UserError

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
    items = [cached[i] for i in range(4)]  # the loader's first batch, in order
    for key in ("latents_w", "latents_l", "prompt_embeds", "pooled_prompt_embeds"):
        assert torch.equal(batch[key], torch.stack([item[key] for item in items])), key
    assert batch["caption"] == [item["caption"] for item in items]


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


def test_a_model_subfolder_that_cannot_be_listed_is_an_error_not_left_out_of_the_key(tmp_path, monkeypatch):
    """rglob skips a folder it may not list (PermissionError): the key left its files out, so changing one reused
    the old latents. Tests run as root (chmod does not stop root), so the listing is refused by a patch."""
    model = tmp_path / "model"
    (model / "text_encoder" / "shards").mkdir(parents=True)
    (model / "text_encoder" / "shards" / "w.bin").write_bytes(b"1")
    (model / "vae").mkdir()
    (model / "vae" / "config.json").write_text("{}")
    assert [f[0] for f in model_identity(model)["files"]] == ["text_encoder/shards/w.bin", "vae/config.json"]
    scandir = os.scandir

    def refused(path="."):
        if os.fspath(path).endswith("shards"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(UserError, match=r"cannot list .*/model/text_encoder/shards \(Permission denied\), a folder of "
                                        r"the model whose files the data cache's key covers: make it readable"):
        model_identity(model)


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


def test_a_marker_that_cannot_be_read_this_once_is_an_error_not_a_rebuild(tmp_path, pairs_path, monkeypatch):
    """Any OSError reading the marker (no permission on a colleague's cache, a network file system's hiccup) made
    a complete cache "incomplete", and the build deleted it."""
    from pathlib import Path

    ds = PairDataset(pairs_path, resolution=16)
    cached = build(ds, FakeEncoders(), tmp_path / "cache")
    marker, read = cached.folder / "complete.json", Path.read_text

    def refuse(self, *args, **kwargs):
        if self == marker:
            raise PermissionError(13, "Permission denied", str(self))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    refused = FakeEncoders()
    with pytest.raises(PermissionError):
        build(ds, refused, tmp_path / "cache")
    assert refused.image_calls == 0  # not deleted and rebuilt
    monkeypatch.undo()
    enc = FakeEncoders()
    build(ds, enc, tmp_path / "cache")
    assert enc.image_calls == 0 and marker.is_file()  # still there, loaded


def test_a_truncated_shard_makes_the_cache_incomplete_and_old_markers_without_sizes_load(tmp_path, pairs_path):
    ds = PairDataset(pairs_path, resolution=16)
    cached = build(ds, FakeEncoders(), tmp_path / "cache")
    marker_path = cached.folder / "complete.json"
    marker = json.loads(marker_path.read_text())
    names = [name for name, _ in marker["pair_shards"] + marker["prompt_shards"]]
    assert marker["shard_bytes"] == {name: (cached.folder / name).stat().st_size for name in names}
    assert names == ["pairs-00000.safetensors", "pairs-00001.safetensors", "pairs-00002.safetensors",
                     "prompts-00000.safetensors"]  # 10 pairs in shards of 4; 4 captions
    shard = cached.folder / "pairs-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # as a host crash can leave it
    enc = FakeEncoders()
    again = build(ds, enc, tmp_path / "cache")
    assert enc.image_calls == 4 and len(again) == 10 and again.folder == cached.folder  # rebuilt in place
    marker = json.loads(marker_path.read_text())
    del marker["shard_bytes"]  # a cache built before sizes were recorded
    marker_path.write_text(json.dumps(marker))
    enc = FakeEncoders()
    assert len(build(ds, enc, tmp_path / "cache")) == 10 and enc.image_calls == 0
    # an edited marker naming a file outside the folder was read as a shard
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((cached.folder / "pairs-00000.safetensors").read_bytes())
    marker["pair_shards"][0][0] = "../../elsewhere.safetensors"
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(UserError, match="names shard '../../elsewhere.safetensors', which is not a file of that"):
        build(ds, FakeEncoders(), tmp_path / "cache")


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
    assert cached.captions == ["ok 0", "bad", "ok 1"]  # ids over all rows, so processes agree without talking
    from t2i_align.errors import UserError

    none = PairDataset(write_pairs(tmp_path / "none.parquet", [row(jpg_0=b"garbage")]), resolution=8)
    with pytest.raises(UserError, match=r"no row of the data could be decoded to cache \(1 undecodable"):
        build(none, FakeEncoders(), tmp_path / "cache2")  # a traceback before


def test_cached_dataset_pickles_for_spawned_workers(tmp_path, pairs_path):
    import pickle

    cached = build(PairDataset(pairs_path, resolution=16), FakeEncoders(), tmp_path / "cache")
    first = cached[5]
    clone = pickle.loads(pickle.dumps(cached))
    assert torch.equal(clone[5]["latents_w"], first["latents_w"]) and clone[5]["caption"] == first["caption"]


def fake_model(folder, vae_weights="vae", vocab="a b c"):
    """A diffusers-layout folder with the files the cache key reads (contents are stand-ins)."""
    for sub, name, data in [("vae", "config.json", '{"scaling_factor": 0.18215}'),
                            ("vae", "diffusion_pytorch_model.safetensors", vae_weights),
                            ("text_encoder", "model.safetensors", "te"), ("tokenizer", "vocab.json", vocab),
                            ("tokenizer", "merges.txt", "#version: 0.2")]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(data)
    return folder


def fake_components(path, family="sd15", vae_dtype=torch.float32, text_dtype=torch.float32, text_encoding="clip77"):
    from types import SimpleNamespace

    from t2i_align.config.sections import TextEncodingConfig

    def encode_prompts(components, prompts):
        raise AssertionError("not called")

    return SimpleNamespace(path=path, spec=SimpleNamespace(name=family, encode_prompts=encode_prompts),
                           vae=torch.nn.Linear(1, 1).to(vae_dtype),
                           text_encoders=[torch.nn.Linear(1, 1).to(text_dtype)],
                           text_encoding=TextEncodingConfig(kind=text_encoding))


def _same_size_same_mtime_edit(path, text):
    import os

    stat = path.stat()
    assert len(text) == stat.st_size
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


MODEL_CHANGES = {
    "vae override": lambda t: {"model": {"vae": str(fake_model(t / "vae_a"))}},
    "other vae override": lambda t: {"model": {"vae": str(fake_model(t / "vae_b", vae_weights="other"))},
                                     "base_model": {"vae": str(fake_model(t / "vae_c"))}},
    "variant": lambda t: {"model": {"variant": "fp16"}},
    "revision": lambda t: {"model": {"revision": "abc123"}},
    "tokenizer contents": lambda t: {"edit": ("tokenizer/vocab.json", "a b d")},
    "vae config": lambda t: {"edit": ("vae/config.json", '{"scaling_factor": 0.13025}')},
    "vae dtype": lambda t: {"components": {"vae_dtype": torch.float16}},
    "text encoder dtype": lambda t: {"components": {"text_dtype": torch.bfloat16}},
    "family": lambda t: {"components": {"family": "sdxl"}},
    "encoding settings": lambda t: {"encoding": {"text_encoding": "segments"}},
}


@pytest.mark.parametrize("change", sorted(MODEL_CHANGES))
def test_every_model_side_input_of_a_cached_tensor_changes_the_key(tmp_path, pairs_path, change):
    """Regression (issue 10, bug 6): switching model.vae, variant or the tokenizer reused the other's latents."""
    from t2i_align.config import ModelConfig
    from t2i_align.data.cache_key import components_key_parts

    model = fake_model(tmp_path / "model")
    spec = MODEL_CHANGES[change](tmp_path)
    base_cfg = ModelConfig(pretrained=str(model), **spec.get("base_model", {}))
    clip77 = {"text_encoding": "clip77"}
    enc, ds = FakeEncoders(), PairDataset(pairs_path, resolution=16)
    first = build(ds, enc, tmp_path / "cache", **components_key_parts(base_cfg, fake_components(model), clip77))
    again = build(ds, enc, tmp_path / "cache", **components_key_parts(base_cfg, fake_components(model), clip77))
    assert again.folder == first.folder and enc.image_calls == 4  # unchanged inputs: reused
    if "edit" in spec:
        _same_size_same_mtime_edit(model / spec["edit"][0], spec["edit"][1])
    cfg = ModelConfig(pretrained=str(model), **{**spec.get("base_model", {}), **spec.get("model", {})})
    components = fake_components(model, **spec.get("components", {}))
    again = build(ds, enc, tmp_path / "cache", **components_key_parts(cfg, components, spec.get("encoding", clip77)))
    assert again.folder != first.folder and enc.image_calls == 8  # rebuilt


@pytest.mark.parametrize("setting", [{"crop": "random"}, {"flip": "joint"}, {"resolution": 8}])
def test_data_transforms_change_the_key(tmp_path, pairs_path, setting):
    enc = FakeEncoders()
    first = build(PairDataset(pairs_path, resolution=16), enc, tmp_path / "cache")
    again = build(PairDataset(pairs_path, **{"resolution": 16, **setting}), enc, tmp_path / "cache")
    assert again.folder != first.folder and enc.image_calls == 8


def test_uncached_config_streams_and_cached_config_keys_the_vae_override_and_text_encoding(tmp_path, pairs_path,
                                                                                          monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    import t2i_align.data.sources as sources
    from t2i_align.config import load_config
    from t2i_align.data.stream import StreamingPairSource

    model, vae = fake_model(tmp_path / "model"), fake_model(tmp_path / "vae")
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device="cpu", main_process_first=nullcontext,
                                  print=lambda *args, **kwargs: None)
    common = [f"data.path={pairs_path}", "data.resolution=16", "train.batch_size=2", f"output_dir={tmp_path / 'run'}",
              f"model.pretrained={model}"]
    assert isinstance(sources.build_data_source(load_config(None, common), None, accelerator), StreamingPairSource)
    monkeypatch.setattr(sources, "_cache_encoders", lambda components, device: (FakeEncoders().images,
                                                                                FakeEncoders().prompts))
    keys = [sources.build_data_source(load_config(None, [*common, "data.cache=true", *extra]),
                                      fake_components(model, text_encoding=kind), accelerator).dataset.key
            for extra, kind in [([], "clip77"), ([f"model.vae={vae}"], "clip77"), ([], "segments"), ([], "clip77")]]
    assert len(set(keys[:3])) == 3 and keys[3] == keys[0]  # the override and the encoding each rebuild


def test_shard_writer_holds_one_shard_buffer_not_the_batches_given(tmp_path):
    """Regression (found by benchmarks/pair_reading.py): the writer kept every batch's tensors, views of whole
    encoder outputs scattered between large pixel batches; glibc's heap grew ~2.5 MB per pair, 4 GB per shard."""
    from safetensors.torch import load_file

    from t2i_align.data.cache_build import _ShardWriter

    writer = _ShardWriter(tmp_path, "x", shard_size=4)
    for k in range(3):
        encoder_output = torch.arange(1000.0).reshape(1000, 1) + 1000 * k  # 4,000 bytes
        writer.add({"v": encoder_output[:3]})  # 3 rows: a view of it
        assert sum(t.untyped_storage().nbytes() for t in writer.buffers.values()) <= 4 * 4  # 4 rows x 4 bytes
    writer.flush()
    assert writer.shards == [["x-00000.safetensors", 4], ["x-00001.safetensors", 4], ["x-00002.safetensors", 1]]
    rows = torch.cat([load_file(str(tmp_path / name))["v"] for name, _ in writer.shards]).flatten().tolist()
    assert rows == [0.0, 1.0, 2.0, 1000.0, 1001.0, 1002.0, 2000.0, 2001.0, 2002.0]


# ---------------------------------------------------------------- a build split over processes (threads here)
def _build_together(pairs_path, root, encoders, world=2, shard_size=4):
    """Each 'process' (a thread) with its own data set and encoders; returns {rank: cache or the error raised}.
    `pairs_path`: one file for all, or one per rank."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rank, team):
        path = pairs_path[rank] if isinstance(pairs_path, list) else pairs_path
        ds = PairDataset(path, resolution=16, crop="random", flip="joint", seed=2)
        try:
            return build_or_load_cache(ds, encoders[rank].images, encoders[rank].prompts, root, {"model": "fake"},
                                       batch_size=3, shard_size=shard_size, team=team)
        except Exception as err:
            return err
    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(one, range(world), thread_team(world)))


def test_two_processes_build_the_one_process_cache_each_encoding_half(tmp_path, pairs_path):
    alone = build(PairDataset(pairs_path, resolution=16, crop="random", flip="joint", seed=2), FakeEncoders(),
                  tmp_path / "alone")
    encoders = [FakeEncoders(), FakeEncoders()]
    together = _build_together(pairs_path, tmp_path / "together", encoders)
    assert together[0].folder == together[1].folder and together[0].folder.name == alone.folder.name  # same key
    assert [e.image_calls for e in encoders] == [2, 2]  # 5 pairs each, 3 per batch (alone: 4 calls for 10)
    assert [e.prompt_calls for e in encoders] == [2, 1]  # 2 captions each + the empty prompt on the main process
    marker = json.loads((together[0].folder / "complete.json").read_text())
    assert marker["pairs_per_process"] == [5, 5] and marker["stats"] == json.loads(
        (alone.folder / "complete.json").read_text())["stats"]
    assert together[0].captions == alone.captions
    for i in range(10):
        a, b = alone[i], together[1][i]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert [p.name for p in (tmp_path / "together").iterdir()] == [alone.folder.name]  # no part folders left


@pytest.mark.parametrize("world", [3, 7, 12])
def test_any_number_of_processes_builds_the_one_process_rows_corrupt_ones_and_empty_shares_included(tmp_path, world):
    """12 processes for 10 rows: some encode nothing. Rows 3 and 8 do not decode: skipped and counted once."""
    rows = [row(caption=f"caption {i % 4}", jpg_0=image_bytes([RED, GREEN, BLUE][i % 3], size=(16 + 8 * (i % 2), 16)),
                jpg_1=b"garbage" if i in (3, 8) else image_bytes(BLUE), label_0=float(i % 2)) for i in range(10)]
    path = write_pairs(tmp_path / "bad.parquet", rows, row_group_size=4)
    alone = build(PairDataset(path, resolution=16, crop="random", flip="joint", seed=2), FakeEncoders(),
                  tmp_path / "alone")
    together = _build_together(path, tmp_path / "together", [FakeEncoders() for _ in range(world)], world=world)
    assert all(c.folder == together[0].folder for c in together) and len(alone) == 8
    marker = json.loads((together[0].folder / "complete.json").read_text())
    assert sum(marker["pairs_per_process"]) == 8 and len(marker["pairs_per_process"]) == world
    assert together[-1].stats == alone.stats and together[-1].stats.corrupt == 2
    for i in range(8):
        a, b = alone[i], together[-1][i]
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_processes_whose_data_rows_differ_all_stop_before_building(tmp_path):
    """A copy on another machine with rows missing (or reordered) only warned: each process encoded its slice of
    its own rows, and the cache paired images with the main process's captions of other rows."""
    from t2i_align.data.cache import DataMismatch

    rows = [row(caption=f"caption {i}", jpg_0=image_bytes(RED), jpg_1=image_bytes(BLUE), label_0=1.0)
            for i in range(6)]
    for name in "abc":
        (tmp_path / name).mkdir()
    main_copy = write_pairs(tmp_path / "a" / "pairs.parquet", rows)
    other_copy = write_pairs(tmp_path / "b" / "pairs.parquet", rows[2:])
    results = _build_together([main_copy, other_copy], tmp_path / "cache", [FakeEncoders(), FakeEncoders()])
    assert all(isinstance(r, DataMismatch) and "process 1's data rows differ" in str(r) for r in results), results
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing started
    same_rows = write_pairs(tmp_path / "c" / "pairs.parquet", rows)  # the same rows in another file: one cache
    together = _build_together([main_copy, same_rows], tmp_path / "cache", [FakeEncoders(), FakeEncoders()])
    assert together[0].folder == together[1].folder and len(together[0]) == 6


def test_a_killed_builds_folder_is_removed_by_the_next_build_on_its_machine(tmp_path, pairs_path):
    """A SIGKILL or OOM kill mid-build left .tmp-KEY-* (near a whole cache's size) for good. This machine's dead
    process's folder goes, whatever its key (settings changed since); a live process's (a concurrent run) and
    another machine's or container's stay."""
    import subprocess

    from t2i_align.data import cache as cache_module

    first = build(PairDataset(pairs_path, resolution=16), FakeEncoders(), tmp_path / "c")
    key = first.folder.name
    shutil.rmtree(first.folder)  # the next build is a real one
    dead = subprocess.Popen(["true"])  # a pid that has exited (our child, reaped)
    dead.wait()
    host = cache_module._HOST
    assert host.endswith(f"_ns{os.stat('/proc/self/ns/pid').st_ino}")  # this container's process ids
    leftovers = {"dead": tmp_path / "c" / f".tmp-{key}-{host}-{dead.pid}-abc_12",
                 "alive": tmp_path / "c" / f".tmp-{key}-{host}-{os.getpid()}-xyz",
                 "other": tmp_path / "c" / f".tmp-{key}-another-host-{dead.pid}-q1",
                 # another container on this host (host networking): its own pids, which os.kill cannot see
                 "other namespace": tmp_path / "c" / f".tmp-{key}-{host.split('_ns')[0]}_ns1-{dead.pid}-q1",
                 "dead, another key": tmp_path / "c" / f".tmp-{'0' * 24}-{host}-{dead.pid}-abc_12"}
    for path in leftovers.values():
        path.mkdir()
    build(PairDataset(pairs_path, resolution=16), FakeEncoders(), tmp_path / "c")
    assert not leftovers["dead"].exists() and not leftovers["dead, another key"].exists()
    assert leftovers["alive"].is_dir() and leftovers["other"].is_dir() and leftovers["other namespace"].is_dir()
    assert (tmp_path / "c" / key).is_dir()


def test_a_process_failing_its_share_fails_every_process_and_leaves_nothing(tmp_path, pairs_path):
    encoders = [FakeEncoders(), FakeEncoders(fail_on_image_call=2)]
    main, other = _build_together(pairs_path, tmp_path / "cache", encoders)
    assert isinstance(other, RuntimeError) and "simulated crash" in str(other)  # its own error
    assert isinstance(main, RuntimeError) and "process 1 wrote no share of the cache" in str(main)
    assert list((tmp_path / "cache").iterdir()) == []  # no cache, no temporary folder


def test_main_process_failing_its_share_stops_the_others_with_its_message(tmp_path, pairs_path):
    main, other = _build_together(pairs_path, tmp_path / "cache", [FakeEncoders(fail_on_image_call=1),
                                                                    FakeEncoders()])
    assert isinstance(main, RuntimeError) and str(main) == "simulated crash"
    assert isinstance(other, RuntimeError) and str(other) == (
        "the main process could not build the cache: RuntimeError: simulated crash")
    assert list((tmp_path / "cache").iterdir()) == []


def test_every_process_uses_the_main_process_cache_and_an_unshared_folder_is_named(tmp_path, pairs_path):
    """A data copy with other modification times has another key: the main process's folder is everyone's. A
    process that cannot see the complete cache the main process found is told the folder is not shared, and the
    main process stops too (else it would wait for that process in the run's first collective)."""
    import shutil

    from t2i_align.errors import UserError

    copy = tmp_path / "copy" / "p.parquet"
    copy.parent.mkdir()
    shutil.copy(pairs_path, copy)
    datasets = [PairDataset(pairs_path, resolution=16), PairDataset(copy, resolution=16)]
    roots = [tmp_path / "cache", tmp_path / "cache"]

    def run():
        from concurrent.futures import ThreadPoolExecutor

        def one(rank, team):
            try:
                return build_or_load_cache(datasets[rank], FakeEncoders().images, FakeEncoders().prompts, roots[rank],
                                           {"model": "fake"}, batch_size=3, shard_size=4, team=team)
            except Exception as err:
                return err
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(one, range(2), thread_team(2)))
    built = run()
    assert built[0].folder == built[1].folder and len(built[1]) == 10
    roots[1] = tmp_path / "elsewhere"  # as if another machine mounted nothing there
    main, unshared = run()
    assert isinstance(unshared, UserError) and "is not shared: process 1 does not see the cache" in str(unshared)
    assert isinstance(main, UserError) and str(main).startswith("another process could not open the cache: the cache "
                                                                "folder") and "process 1" in str(main)


def test_image_caption_data_caches_its_latents_sizes_and_dropout_draws(tmp_path):
    """LongAlign's stage-1 data (one image per row): cached items are the uncached items encoded, with the same
    seeded prompt dropout, sizes and crops; an undecodable image is skipped and counted once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2i_align.data.captions import CaptionDataset

    rows = [{"caption": f"caption {i % 5}", "jpg": image_bytes([RED, GREEN, BLUE][i % 3], size=(16 + 8 * (i % 2), 16))}
            for i in range(12)]
    rows[4]["jpg"] = b"not an image"
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)

    def data():
        return CaptionDataset(path, resolution=16, crop="random", flip="joint", prompt_dropout=0.3, seed=5)
    cached = build(data(), FakeEncoders(), tmp_path / "cache")
    assert len(cached) == 11 and (cached.stats.rows, cached.stats.used, cached.stats.bad_images) == (12, 11, 1)
    plain = data()
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        items = [plain[i] for i in range(12) if i != 4]
        for j, item in enumerate(items):
            hit = cached[j]
            assert hit["caption"] == item["caption"] and hit["index"] == j
            assert torch.equal(hit["prompt_embeds"], FakeEncoders.embed(item["caption"])["prompt_embeds"])
            if epoch == 0:  # augmentations are frozen at caching time (epoch 0)
                assert torch.equal(hit["latents"], F.avg_pool2d(item["pixels"], 8))
                assert (hit["original_size"], hit["crop_top_left"]) == (item["original_size"], item["crop_top_left"])
    assert 0 < sum(cached[j]["caption"] == "" for j in range(11)) < 11
    again = build(data(), FakeEncoders(), tmp_path / "cache")
    assert again.folder == cached.folder and isinstance(again.stats, type(plain.stats))


def test_a_cache_with_random_augmentation_says_it_is_drawn_once():
    """PPD's shipped configs asked for random flips with data.cache=true and got one fixed draw without a word."""
    from types import SimpleNamespace

    from t2i_align.config import DataConfig
    from t2i_align.data.sources import note_frozen_augmentation

    said = []
    accelerator = SimpleNamespace(print=lambda message, file=None: said.append(message))
    note_frozen_augmentation(accelerator, DataConfig(flip="independent", crop="random"))
    note_frozen_augmentation(accelerator, DataConfig(flip="none", crop="center"))
    assert len(said) == 1 and "data.flip=independent and data.crop=random are drawn once" in said[0]


def test_a_cache_another_run_publishes_meanwhile_is_kept(tmp_path, monkeypatch):
    """Absent at the first look, then renamed into place by a concurrent run: it was deleted as incomplete."""
    import t2i_align.data.cache as cache

    folder = tmp_path / "cache" / "k"
    looks = []

    def complete(path, key):
        looks.append(path)
        if len(looks) == 1:  # the other run publishes between the two looks
            folder.mkdir(parents=True)
            return False
        return True

    monkeypatch.setattr(cache, "_is_complete", complete)
    assert cache._start_build(folder, "k") is None and folder.is_dir()
