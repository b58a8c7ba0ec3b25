"""LongAlign's data: the prompt source (sharding, order, resume), prompt batches, image-caption data (bad rows
skipped and counted, paths kept inside their root), the toy caption export, the data.kind checks, and the cache
key's dependence on the text encoding."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401  (fixture)
from t2i_align.config import ConfigError, ModelConfig, load_config
from t2i_align.data.captions import CaptionDataset
from t2i_align.data.pairs import collate_pairs
from t2i_align.data.prompts_source import PromptSource
from t2i_align.data.sources import check_data_kind
from t2i_align.prompts import read_prompts
from t2i_align.toy.evaluate import prompt_set
from t2i_align.toy.scenes import scene_from_caption


def prompts(n):
    return [f"prompt {i}" for i in range(n)]


def test_prompt_source_shards_disjoint_whole_batches_and_same_order_for_a_seed():
    # 11 prompts, 2 processes, batch 2: 11 // 2 // 2 = 2 batches per process per epoch, 8 prompts used, 3 dropped.
    ranks = [PromptSource(prompts(11), 2, seed=5, rank=r, world=2, resolution=32) for r in (0, 1)]
    assert [s.batches_per_epoch for s in ranks] == [2, 2]
    seen = [s.epoch_indices(0) for s in ranks]
    assert [len(x) for x in seen] == [4, 4] and not set(seen[0]) & set(seen[1])
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5 * 100_003)).tolist()
    assert seen[0] == perm[0::2][:4] and seen[1] == perm[1::2][:4]  # process r: every 2nd, from r
    again = PromptSource(prompts(11), 2, seed=5, rank=0, world=2, resolution=32)
    assert again.epoch_indices(0) == seen[0] and again.epoch_indices(1) != seen[0]  # per (seed, epoch)
    batch = next(ranks[1].micro_batches())
    assert batch == {"caption": [f"prompt {i}" for i in seen[1][:2]], "index": seen[1][:2], "resolution": 32}


def test_prompt_source_resume_skips_exactly_the_consumed_micro_batches():
    source = PromptSource(prompts(10), 3, seed=0, rank=0, world=1, resolution=8)  # 3 per epoch, 1 prompt dropped
    stream = source.micro_batches(0)
    first = [next(stream)["caption"] for _ in range(8)]  # across two epoch boundaries
    for start in (1, 3, 4, 7):
        resumed = source.micro_batches(start)
        assert [next(resumed)["caption"] for _ in range(8 - start)] == first[start:]
    assert sorted(p for b in first[:3] for p in b) == sorted(prompts(10)[i] for i in source.epoch_indices(0))


def test_prompt_source_refuses_too_few_prompts():
    with pytest.raises(ConfigError, match="too few for train.batch_size=4 on 2"):
        PromptSource(prompts(7), 4, seed=0, rank=0, world=2, resolution=8)


def test_toy_long_prompt_sets_parse_back_to_their_scenes():
    long = read_prompts("toy:heldout-long")
    assert len(long) == 60 and len(read_prompts("toy:train-long")) == 300
    assert [scene_from_caption(c) for c in long] == prompt_set("heldout")
    assert all(c.split(". ")[-1].startswith("Behind the") for c in long)  # the background sentence is last
    assert len({c.split(". ")[1] for c in long}) > 1  # fillers shuffled per prompt
    with pytest.raises(ConfigError, match="toy:heldout-long"):
        read_prompts("toy:test-long")


def test_prompt_batch_has_sdxl_time_ids_at_the_training_resolution(tmp_path):
    from t2i_align.batches import BATCH_BUILDERS
    from t2i_align.models import load_components

    raw = {"caption": ["a cat", "a photo of a cat"], "index": [0, 1], "resolution": 64}
    for family in ("sd15", "sdxl"):
        comps = load_components(ModelConfig(pretrained=str(save_tiny_pipeline(family, tmp_path / family))))
        batch = BATCH_BUILDERS["prompts"](comps, raw, torch.device("cpu"))
        assert batch.captions == ["a cat", "a photo of a cat"] and len(batch.embeds) == 2
        if family == "sd15":
            assert batch.time_ids is None
        else:  # (original h, w, crop top, left, target h, w): an uncropped 64 x 64 image
            assert batch.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def png(color, size=(12, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_caption_rows_with_unusable_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(data / "img" / "blue.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "outside.png")  # exists, but outside the root
    pq.write_table(pa.Table.from_pylist([
        {"caption": "red", "jpg": png((255, 0, 0))},
        {"caption": "broken", "jpg": b"not an image"},
    ]), data / "a.parquet")
    pq.write_table(pa.Table.from_pylist([  # Hugging Face `Image` layout, empty caption (None: skipped, below)
        {"caption": "", "jpg": {"bytes": png((0, 0, 255)), "path": None}}]), data / "b.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"caption": "blue file", "path": "img/blue.png"},
        {"caption": "escapes", "path": "../outside.png"},
        {"caption": "absolute", "path": str(tmp_path / "outside.png")},
        {"caption": "missing", "path": "img/none.png"},
    ]), data / "c.parquet")
    ds = CaptionDataset(data, resolution=8)
    assert len(ds) == 7 and ds.captions[2] == ""
    items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [False, True, False, False, True, True, True]
    assert ds.stats.bad_images == 4
    red, blue = items[0]["pixels"], items[3]["pixels"]
    assert red.shape == (3, 8, 8) and red[0].min() == 1.0 and red[2].max() == -1.0
    assert blue[2].min() == 1.0 and items[0]["original_size"] == (8, 12)  # (h, w) after the resize to 8
    batch = collate_pairs(items[:4])
    assert batch["skipped"] == 1 and batch["caption"] == ["red", "", "blue file"]
    assert batch["pixels"].shape == (3, 3, 8, 8) and batch["original_size"].shape == (3, 2)
    assert collate_pairs(items[4:]) is None  # all bad: the loop reads the next batch
    assert ds.largest_byte_group() == 2  # a.parquet's one group of image bytes; c.parquet holds paths


def test_uncached_image_bytes_in_large_row_groups_get_a_note(tmp_path):
    """Each shuffled item reads its whole row group: 256 rows of image bytes read 256 times over per epoch."""
    from types import SimpleNamespace

    from t2i_align.config import load_config
    from t2i_align.data.captions import build_caption_source

    rows = [{"caption": f"c{i}", "jpg": png((i, 0, 0))} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "small.parquet", row_group_size=8)
    said = []
    accelerator = SimpleNamespace(print=lambda message, file=None: said.append(message), process_index=0,
                                  num_processes=1)
    for name in ("big", "small"):
        cfg = load_config(None, ["objective.name=sft", "data.kind=captions", f"data.path={tmp_path / name}.parquet",
                                 "data.resolution=8"])
        build_caption_source(cfg, None, accelerator)
    notes = [m for m in said if m.startswith("note: data.path keeps image bytes")]
    assert len(notes) == 1 and "row groups of up to 40 rows" in notes[0]


def test_caption_rows_without_caption_text_are_skipped_and_counted(tmp_path):
    """A None caption was trained on as "" without a count, and bytes b'a cat' became the text "b'a cat'" (now
    decoded: "a cat", as pair captions; bytes that are not UTF-8 are no caption)."""
    from t2i_align.data.captions import CaptionStats

    pq.write_table(pa.Table.from_pylist([{"caption": "red", "jpg": png((255, 0, 0))},
                                         {"caption": None, "jpg": png((0, 255, 0))},
                                         {"caption": "", "jpg": png((0, 0, 255))}]), tmp_path / "a.parquet")
    pq.write_table(pa.table({"caption": pa.array([b"a cat", b"caf\xff"], pa.binary()), "jpg": [png((1, 2, 3))] * 2}),
                   tmp_path / "b.parquet")
    ds = CaptionDataset(tmp_path, resolution=8)
    assert ds.captions == ["red", "", "a cat"] and [ds[i]["caption"] for i in range(3)] == ["red", "", "a cat"]
    assert ds[1]["pixels"][2].min() == 1.0  # the empty caption's row is the blue image, used
    assert ds.stats.summary() == "rows=5, used=3, bad images=0, no caption=2"
    assert CaptionStats(rows=3, used=3, bad_images=0).no_caption == 0  # as a cache built before the count loads
    pq.write_table(pa.Table.from_pylist([{"caption": None, "jpg": png((1, 2, 3))}]), tmp_path / "none.parquet")
    with pytest.raises(ConfigError, match=r"no rows in .*none.parquet.*\(rows=1, used=0, bad images=0, no caption=1"):
        CaptionDataset(tmp_path / "none.parquet")


def test_max_items_takes_that_many_rows_across_several_files(tmp_path):
    """The loop over files went on after the limit: each further file added one row (3 files of 4, 2 asked: 4)."""
    for f in range(3):
        pq.write_table(pa.Table.from_pylist([{"caption": f"f{f} r{r}", "jpg": png((f, r, 0))} for r in range(4)]),
                       tmp_path / f"{f}.parquet")
    assert CaptionDataset(tmp_path, resolution=8, max_items=2).captions == ["f0 r0", "f0 r1"]
    assert CaptionDataset(tmp_path, resolution=8, max_items=6).captions == [f"f{i // 4} r{i % 4}" for i in range(6)]
    # prompts as data (data.kind=prompts) took every prompt whatever data.max_pairs said
    from t2i_align.config import DataConfig
    from t2i_align.data.prompts_source import read_prompt_data

    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    assert read_prompt_data(DataConfig(kind="prompts", path=str(tmp_path / "p.txt"), max_pairs=2)) == ["a", "b"]
    assert read_prompt_data(DataConfig(kind="prompts", path=str(tmp_path / "p.txt"))) == ["a", "b", "c"]


def test_a_prompt_holding_a_form_feed_or_line_separator_stays_one_prompt(tmp_path):
    """str.splitlines cut a prompt at U+2028 or a form feed: two prompts in the file, four read."""
    (tmp_path / "p.txt").write_text("a cat\u2028on a mat\nsecond\x0cprompt\r\nthird\n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat\u2028on a mat", "second\x0cprompt", "third"]


def test_prompt_files_in_jsonl_or_csv_give_their_prompt_field(tmp_path):
    """A .csv or .jsonl prompt file (t2i-score's, generate.py's metadata.jsonl) was read as text: its header, or
    each whole JSON line, became a prompt and the images were made for it without a word."""
    (tmp_path / "p.csv").write_text('file,prompt\na.png,"a red circle, small"\nb.png,\nc.png,a cat\n')
    assert read_prompts(str(tmp_path / "p.csv")) == ["a red circle, small", "a cat"]  # the empty one skipped
    (tmp_path / "m.jsonl").write_text('{"file": "0.png", "prompt": "a cat", "seed": 0}\n\n{"file": "1.png", '
                                      '"prompt": "a cat", "seed": 1}\n{"caption": "x", "prompt": "a dog"}\n')
    assert read_prompts(str(tmp_path / "m.jsonl")) == ["a cat", "x"]  # a row per image: each prompt once; caption
    # first, as a pair listing reads it (stage 1 trained on the caption, stage 2 read the prompt)
    (tmp_path / "c.jsonl").write_text('{"caption": "a long\\n\\ncaption"}\n{"prompt": ["a", "b"]}\n{"prompt": 7}\n')
    assert read_prompts(str(tmp_path / "c.jsonl")) == ["a long caption", "7"]  # a list is no prompt, a number is
    # a .json list (benchmark prompt lists) was read as lines: "[" and "]" were sampled and scored as prompts
    (tmp_path / "l.json").write_text('[\n "a red circle",\n {"prompt": "a dog"},\n "a red circle"\n]\n')
    assert read_prompts(str(tmp_path / "l.json")) == ["a red circle", "a dog"]
    (tmp_path / "s.jsonl").write_text('{"prompt": "a cat \\ud83d"}\n')  # half an emoji: the tokenizer's traceback
    with pytest.raises(ConfigError, match="prompt 1 of .*s.jsonl .* holds half of a character"):
        read_prompts(str(tmp_path / "s.jsonl"))
    (tmp_path / "t.tsv").write_text("id\tprompt\n1\ta cat\n")
    with pytest.raises(ConfigError, match="is a .tsv file, which is not read here"):
        read_prompts(str(tmp_path / "t.tsv"))
    for name, text, message in (("n.jsonl", '{"prompt": "a"}\n{"text": "a cat"}\n', r"line 2 of .* has no 'caption' "
                                 r"or 'prompt' field, only \['text'\]"),
                                ("bad.jsonl", "a cat\n", "cannot read .* UTF-8 JSON lines"),
                                ("list.jsonl", "[1, 2]\n", "holds no rows of fields"),
                                ("torn.csv", "file,prompt\na.png,a red circle, small\n", "line 2 has more or fewer"),
                                ("e.csv", "file,prompt\na.png,\n", "holds no prompts \\(every caption or prompt")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_prompts(str(tmp_path / name), "--prompts")


def test_a_csv_quote_left_open_is_refused_at_the_line_it_opens(tmp_path):
    """A prompt's double quote left open took every row after it (to the next quote, or the file's end) into one
    prompt, without a word. A quoted caption over several lines, closed, is read (as pandas writes one)."""
    (tmp_path / "ok.csv").write_text('caption\n"a ""big"" dog, running"\n"para one.\n\npara two."\na cat\n')
    assert read_prompts(str(tmp_path / "ok.csv")) == ['a "big" dog, running', "para one. para two.", "a cat"]
    for text, told in (('caption\na cat\n\n"a dog, running\na bird\na fish\n', "unexpected end of data"),
                       ('caption\na cat\n\n"a dog, running\na bird\n"a fish"\n', "',' expected after '\"'")):
        (tmp_path / "p.csv").write_text(text)
        with pytest.raises(ConfigError, match=rf"cannot read .*p.csv: line 4: {told} \(a quote left open\? close it, "
                                              r'or write a quote inside a field as two \(""\)\)'):
            read_prompts(str(tmp_path / "p.csv"))


def test_jsonl_prompt_errors_name_the_files_own_line(tmp_path):
    """json's position ("line 1 column 13") was the line's, and a row's count skipped blank lines."""
    (tmp_path / "p.jsonl").write_text('{"caption": "a"}\n\n\n{"caption": bad}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl: line 4 is not JSON \(Expecting value at column 13\)"):
        read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "p.jsonl").write_text('{"caption": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(ConfigError, match="line 3 of .*p.jsonl has no 'caption' or 'prompt' field"):
        read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "p.csv").write_text('caption,seed\n\na cat,1\n\na dog,2,3\n')  # a CSV record's line too
    with pytest.raises(ConfigError, match="p.csv line 5 has more or fewer fields"):
        read_prompts(str(tmp_path / "p.csv"))


def test_a_symlink_loop_in_an_image_path_is_a_bad_image_not_a_crash(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    pq.write_table(pa.Table.from_pylist([{"caption": "loop", "path": "a/x.png"},
                                         {"caption": "blue", "path": "blue.png"}]), tmp_path / "c.parquet")
    ds = CaptionDataset(tmp_path / "c.parquet", resolution=8)
    assert [ds[i] is None for i in range(2)] == [True, False] and ds.stats.bad_images == 1


def test_an_image_file_replaced_under_its_name_gives_another_cache_key(tmp_path):
    """LongAlign's stage-1 data names its image files (a `path` column): one replaced under the same name was read
    from the latent cache, its old pixels trained on without a word."""
    import os

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    pq.write_table(pa.Table.from_pylist([{"caption": "a", "path": "a.png"}, {"caption": "gone", "path": "x.png"}]),
                   tmp_path / "c.parquet")
    before = CaptionDataset(tmp_path / "c.parquet", resolution=8).identity()
    assert CaptionDataset(tmp_path / "c.parquet", resolution=8).identity() == before  # stable while nothing changes
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(1, 1))
    assert CaptionDataset(tmp_path / "c.parquet", resolution=8).identity() != before


@pytest.mark.parametrize("rank, shown", [("0", None), ("1", True)])
def test_hashing_the_image_files_shows_a_bar_on_the_main_process(tmp_path, monkeypatch, rank, shown):
    """The cache key stats every image file a `path` column names (minutes for millions on a network drive) with
    nothing on screen. Now a tqdm bar: only on a terminal (disable=None), once it lasts a second, on rank 0 only."""
    import tqdm.auto

    bars = []

    def bar(iterable, **kwargs):
        bars.append({**kwargs, "total": len(iterable)})
        return iterable

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    pq.write_table(pa.Table.from_pylist([{"caption": "a", "path": "a.png"}, {"caption": "b", "path": "a.png"}]),
                   tmp_path / "c.parquet")
    expected = CaptionDataset(tmp_path / "c.parquet", resolution=8).identity()
    monkeypatch.setattr(tqdm.auto, "tqdm", bar)
    monkeypatch.setenv("RANK", rank)
    assert CaptionDataset(tmp_path / "c.parquet", resolution=8).identity() == expected  # the same key
    assert [(b["desc"], b["total"], b["disable"], b["delay"]) for b in bars] == [("hashing image files", 2, shown, 1)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_files_are_turned_upright_by_their_exif_orientation(tmp_path, fmt):
    """As image bytes are (decode_rgb): a camera's 8x4 file with orientation 6 (rotate 90) is a 4x8 image."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), (255, 0, 0)).save(tmp_path / "cam.img", format=fmt, exif=exif)
    pq.write_table(pa.Table.from_pylist([{"caption": "cam", "path": "cam.img"}]), tmp_path / "c.parquet")
    ds = CaptionDataset(tmp_path / "c.parquet", resolution=8)
    assert ds.decode(0).size == (4, 8) and ds[0]["original_size"] == (8, 4)  # (h, w) of the upright image


def test_caption_data_without_image_column_is_a_config_error(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "jpg_0": png((1, 2, 3))}]), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="needs a caption column and a jpg"):
        CaptionDataset(tmp_path / "p.parquet")


def test_caption_rows_without_an_image_path_are_skipped_and_empty_data_refused(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    pq.write_table(pa.Table.from_pylist([{"caption": "blue", "path": "blue.png"}, {"caption": "empty", "path": ""},
                                         {"caption": "none", "path": None}]), tmp_path / "c.parquet")
    ds = CaptionDataset(tmp_path / "c.parquet", resolution=8)
    assert [ds[i] is None for i in range(3)] == [False, True, True] and ds.stats.bad_images == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "path": pa.array([], pa.string())}),
                   empty / "e.parquet")
    with pytest.raises(ConfigError, match="no rows in .*empty: expected parquet with a caption column"):
        CaptionDataset(empty)


def test_toy_caption_export_is_ground_truth_and_reproducible(tmp_path):
    from t2i_align.data.images import decode_rgb
    from t2i_align.toy.captions import export_captions
    from t2i_align.toy.judge import judge_image

    scenes = prompt_set("heldout")[:6]
    summary = export_captions(tmp_path / "a", scenes, per_scene=2, seed=3)
    again = export_captions(tmp_path / "b", scenes, per_scene=2, seed=3)
    assert summary["rows"] == 12
    table = pq.read_table(summary["path"]).to_pylist()
    assert table == pq.read_table(again["path"]).to_pylist()
    for row in table:
        scene = scene_from_caption(row["caption"])
        assert scene.as_dict() == {k: row[k] for k in scene.as_dict()}
        assert judge_image(np.asarray(decode_rgb(row["jpg"])), scene).score == 1.0


def cfg_with(*overrides):
    return load_config(None, list(overrides))


def test_missing_caption_data_is_named_as_caption_data(tmp_path):
    """It was called "pair data", with the toy pairs command to make it."""
    from t2i_align.data.captions import caption_files

    cfg = cfg_with("objective.name=sft", "data.kind=captions", f"data.path={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="image-caption data .*none does not exist.*toy captions --out DIR"):
        caption_files(cfg.data)


def test_data_kind_must_feed_the_objective():
    check_data_kind(cfg_with("objective.name=sft", "data.kind=captions"), "images")
    check_data_kind(cfg_with("objective.name=sft"), "images")  # SFT on a pair's preferred image
    check_data_kind(cfg_with("objective.name=reward_backprop", "data.kind=prompts"), "prompts")
    with pytest.raises(ConfigError, match="dpo trains on pairs batches, which data.kind=captions cannot give"):
        check_data_kind(cfg_with("data.kind=captions"), "pairs")
    with pytest.raises(ConfigError, match="set data.kind to prompts"):
        check_data_kind(cfg_with("objective.name=reward_backprop"), "prompts")
    with pytest.raises(ConfigError, match="set raft.enabled=false and data.kind=prompts"):
        check_data_kind(cfg_with("objective.name=reward_backprop", "raft.enabled=true", "raft.prompts=toy:train"),
                        "prompts")
    with pytest.raises(ConfigError, match="data.kind"):
        cfg_with("data.kind=images")


def test_cache_key_changes_with_the_text_encoding(tmp_path):
    from t2i_align.config.sections import TextEncodingConfig
    from t2i_align.data.cache_key import cache_key, components_key_parts
    from t2i_align.data.sources import encoding_settings
    from t2i_align.models import load_components

    folder = str(save_tiny_pipeline("sd15", tmp_path / "sd15"))
    keys = {}
    for kind, budget in (("clip77", 240), ("segments", 240), ("segments", 120)):
        mcfg = ModelConfig(pretrained=folder, text_encoding=TextEncodingConfig(kind, budget))
        keys[kind, budget] = cache_key(components_key_parts(mcfg, load_components(mcfg),
                                                            encoding_settings(load_components(mcfg))))
    assert len(set(keys.values())) == 3
    mcfg = ModelConfig(pretrained=folder)  # the same choice gives the same key
    assert cache_key(components_key_parts(mcfg, load_components(mcfg), {})) == keys["clip77", 240]


def test_stage_two_reads_the_captions_of_a_parquet_whole(tmp_path):
    """Stage 2's prompts had to be a text file, which cuts LongAlign's multi-paragraph captions into a prompt per
    paragraph: a parquet's caption column is read as one prompt per row, line breaks made spaces."""
    from t2i_align.prompts import read_prompts

    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["A red cube.\n\nOn a gray floor.", None, "  ", "a  cat\n", "a cat"],
                             "jpg": [b"x"] * 5}), path)
    # each once: a pair set repeats a prompt per pair (it was sampled, and counted by compare.py, that many times)
    assert read_prompts(str(path), "data.path") == ["A red cube. On a gray floor.", "a cat"]
    # bytes (text some tools write as binary) decoded, as pair and caption data do; not UTF-8: skipped
    pq.write_table(pa.table({"caption": [b"bytes", b"a dog", b"caf\xff"]}), tmp_path / "bytes.parquet")
    assert read_prompts(str(tmp_path / "bytes.parquet"), "data.path") == ["bytes", "a dog"]
    pq.write_table(pa.table({"caption": [b"caf\xff", b" "]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="every caption empty or not text"):
        read_prompts(str(tmp_path / "bad.parquet"), "data.path")
    pq.write_table(pa.table({"text": ["a cat"]}), tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="data.path: .*other.parquet has no readable caption column"):
        read_prompts(str(tmp_path / "other.parquet"), "data.path")
    pq.write_table(pa.table({"caption": [None, ""]}, schema=pa.schema([("caption", pa.string())])),
                   tmp_path / "empty.parquet")
    with pytest.raises(ConfigError, match="holds no captions \\(2 rows, every caption empty or not text\\)"):
        read_prompts(str(tmp_path / "empty.parquet"), "data.path")


def not_utf8_strings(values):
    """A pyarrow string array holding `values` (bytes) unchecked, as a tool that does not check UTF-8 writes."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.array(offsets).buffers()[1],
                                                             pa.py_buffer(b"".join(values))])


def test_odd_image_paths_and_leftover_files_are_bad_rows_not_crashes(tmp_path, monkeypatch):
    """A path that is not UTF-8 (a Latin-1 file name) stopped training and the cache build; a path naming a FIFO
    blocked the read forever; macOS's ._*.parquet copies made the folder unusable; one open file per shard reached
    the open-file limit ("Too many open files" read as a damaged file)."""
    import os

    import t2i_align.data.images as images
    from t2i_align.data.stream import RowReader

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    pq.write_table(pa.table({"caption": ["x", "y", "z", "w"],
                             "path": not_utf8_strings([b"a.png", b"caf\xe9.png", b"pipe.png", b"a.png"])}),
                   tmp_path / "c.parquet")
    (tmp_path / "._c.parquet").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = CaptionDataset(tmp_path, resolution=8)
    assert len(ds.files) == 1 and len(ds) == 4
    assert [ds[i] is None for i in range(4)] == [False, True, True, False] and ds.stats.bad_images == 2
    assert [row[1] for row in RowReader(ds).rows(np.arange(4))] == ["a.png", None, "pipe.png", "a.png"]
    monkeypatch.setattr(images, "OPEN_FILES", 2)
    (tmp_path / "many").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "many" / "a.png")
    for i in range(5):
        pq.write_table(pa.table({"caption": [f"c{i}"], "path": ["a.png"]}), tmp_path / "many" / f"{i}.parquet")
    shards = CaptionDataset(tmp_path / "many", resolution=8)
    closed = []
    monkeypatch.setattr(pq.ParquetFile, "close", lambda self, force=False: closed.append(self))
    assert all(shards[i] is not None for i in (0, 1, 2, 3, 4, 0)) and len(shards._handles) == 2
    assert len(closed) == 4  # opened 6 times (file 0 twice), at most 2 open


def test_image_paths_relative_to_another_folder_need_data_image_root(tmp_path):
    """Metadata kept apart from its images: the dry run passed, then the run read an epoch of skipped rows and
    blamed the images' decoding; there was no setting for the folder the paths are relative to."""
    from t2i_align.data.captions import caption_files, load_captions

    (tmp_path / "images").mkdir()
    (tmp_path / "meta").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "images" / "0.png")
    pq.write_table(pa.table({"caption": ["blue", "blue"], "path": ["images/0.png", str(tmp_path / "images/0.png")]}),
                   tmp_path / "meta" / "c.parquet")
    cfg = load_config(None, ["data.kind=captions", f"data.path={tmp_path / 'meta'}", "data.resolution=8"]).data
    with pytest.raises(ConfigError, match=r"none of the first 2 image paths of c.parquet is a file inside the image "
                                          r"root .*meta \(e.g. 'images/0.png'\).*set data.image_root"):
        caption_files(cfg, check_columns=True)
    cfg.image_root = str(tmp_path)
    dataset = load_captions(cfg, seed=0)
    assert [dataset[i] is not None for i in range(2)] == [True, True]
    cfg.image_root = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.image_root=.*nowhere is not a folder"):
        load_captions(cfg, seed=0)
