"""PPD data plumbing (t2i_align/users/training.py, data/pairs.py, data/cache.py, toy/ppd.py): user ids survive the
pair loader and the cache, unknown users are skipped and counted, user tokens and their dropout, layer selection,
shots never overlap trained pairs, and too few shots fail clearly."""
import random

import numpy as np
import pytest
import torch

from helpers import one_torch_thread  # noqa: F401
from t2i_align.data.pairs import PairDataset, collate_pairs
from t2i_align.errors import UserError
from t2i_align.users import UserTable, UserTableError
from t2i_align.users.training import (ShotOverlapError, UserLookup, check_shots_disjoint, load_training_table,
                                      pair_fingerprint)
from test_ppd_loop import write_user_pairs


def test_pair_loader_keeps_each_rows_user_id_through_drops_and_collation(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = PairDataset(write_user_pairs(tmp_path / "p.parquet", users=[5, 6, 7], n=6), resolution=16)
    assert data.user_ids == [5, 6, 7, 5, 6, 7]
    assert data[1]["user_id"] == 6
    data.drop([0, 2])
    assert data.user_ids == [6, 5, 6, 7] and data[0]["user_id"] == 6
    batch = collate_pairs([data[1], None, data[3]])
    assert batch["user_id"] == [5, 7] and batch["skipped"] == 1  # a list, as the ids are: ints or strings
    table = pq.read_table(tmp_path / "p.parquet")
    named = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                             pa.array(["anna", "ben", None, "anna", "ben", "cy"]))
    pq.write_table(named, tmp_path / "named.parquet")
    data = PairDataset(tmp_path / "named.parquet", resolution=16)
    assert data.user_ids == ["anna", "ben", None, "anna", "ben", "cy"]
    assert collate_pairs([data[1], data[2]])["user_id"] == ["ben", None]  # a missing id stays None (unknown)


def test_cache_stores_the_user_ids(tmp_path):
    from t2i_align.data.cache import build_or_load_cache

    data = PairDataset(write_user_pairs(tmp_path / "p.parquet", users=[3, 4], n=4), resolution=16)
    cached = build_or_load_cache(data, lambda px: torch.zeros(len(px), 4, 2, 2),
                                 lambda caps: {"prompt_embeds": torch.zeros(len(caps), 77, 8)}, tmp_path / "c", {})
    assert cached.user_ids == [3, 4, 3, 4]
    assert [cached[i]["user_id"] for i in range(4)] == [3, 4, 3, 4]


def test_unknown_users_are_left_out_before_the_rows_are_shared_out(tmp_path, caplog):
    """Rows of users missing from the table were dropped batch by batch: a batch of 4 with 2 of them trained on 2
    pairs, each weighing twice as much. Now the source serves only known users' rows, full batches."""
    from t2i_align.data.cache import build_or_load_cache
    from t2i_align.data.sources import OfflineSource
    from t2i_align.users.training import known_rows

    table = UserTable([1, 2], torch.zeros(2, 1, 3))
    with caplog.at_level("WARNING"):
        assert known_rows([1, 9, 2, 9, 9, 2, 1], table, "the training data") == [0, 2, 5, 6]
    assert "3 of 7 pairs of the training data belong to users missing from the user table" in caplog.text
    data = PairDataset(write_user_pairs(tmp_path / "p.parquet", users=[1, 9, 2], n=9), resolution=16)
    cached = build_or_load_cache(data, lambda px: torch.zeros(len(px), 4, 2, 2),
                                 lambda caps: {"prompt_embeds": torch.zeros(len(caps), 77, 8)}, tmp_path / "c", {})
    rows = known_rows(cached.user_ids, table, "the training data")
    shares = [OfflineSource(cached, lambda items: items, 3, seed=0, rank=r, world=2, rows=rows) for r in (0, 1)]
    batches = [next(s.micro_batches()) for s in shares]
    assert all(len(batch) == 3 and {item["user_id"] for item in batch} <= {1, 2} for batch in batches)
    assert sorted(item["index"] for batch in batches for item in batch) == rows  # 6 known rows, 3 per process
    whole = OfflineSource(cached, lambda items: items, 3, seed=0, rank=0, world=1)
    assert whole.per_rank == 9 and whole._epoch_indices(0) == torch.randperm(
        9, generator=torch.Generator().manual_seed(0)).tolist()  # no rows given: the order as before


def test_int_pair_ids_and_a_text_id_table_are_refused_in_the_dry_run(tmp_path, capsys):
    """Pairs' user_id 1000 and a table's '1000' (ids from JSON keys) never match: the dry run passed and the run
    failed after the model and the cache, saying the users were ['1000'] and ['1000']. Now the dry run refuses,
    naming both types."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_script", root / "train" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    (tmp_path / "data").mkdir()
    write_user_pairs(tmp_path / "data" / "p.parquet", users=[1000], n=4)
    table = UserTable(["1000"], torch.zeros(1, 4, 64)).save(tmp_path / "t.safetensors")
    args = ["--dry-run", "--config", str(root / "configs/toy/ppd.yaml"), "model.pretrained=toy",
            f"output_dir={tmp_path / 'run'}", "train.batch_size=2", f"data.path={tmp_path / 'data'}",
            f"ppd.table={table}"]
    assert train.main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "user ids in the training data are int but the user table's are str (e.g. 1000 vs '1000')" in last
    UserTable([1000], torch.zeros(1, 4, 64)).save(table)
    assert train.main(args) == 0


def test_user_tokens_and_embedding_dropout_by_hand():
    emb = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3) + 1
    lookup = UserLookup(UserTable(["a", "b"], emb), dropout=0.0)
    tokens = lookup.batch_tokens({"user_id": ["b", "a", "b"]})
    assert torch.equal(tokens, torch.stack([emb[1], emb[0], emb[1]]))
    dropped = UserLookup(UserTable(["a", "b"], emb), dropout=0.5)
    torch.manual_seed(0)
    expected_keep = torch.rand(4) >= 0.5  # the draw batch_tokens makes
    torch.manual_seed(0)
    out = dropped.batch_tokens({"user_id": ["a", "b", "a", "b"]})
    for row, keep in enumerate(expected_keep.tolist()):
        assert torch.equal(out[row], emb[row % 2] if keep else torch.zeros(2, 3))
    assert 0 < int(expected_keep.sum()) < 4  # this seed drops some rows and keeps others
    with pytest.raises(UserError, match="no user_id column"):
        lookup.batch_tokens({"caption": ["x"]})


def test_layer_selection_of_a_table_of_vlm_states(tmp_path):
    emb = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)  # 2 users, 5 "layers" of width 2
    path = UserTable([10, 11], emb).save(tmp_path / "t.safetensors")
    assert torch.equal(load_training_table(path, "all").embeddings, emb)
    assert torch.equal(load_training_table(path, "last").embeddings, emb[:, 4:])
    assert torch.equal(load_training_table(path, "2").embeddings, emb[:, 3:])
    with pytest.raises(UserTableError, match="1..5"):
        load_training_table(path, "6")


def test_corrupt_table_and_mismatched_width_fail_clearly(tmp_path):
    from t2i_align.errors import UserError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_training_table(bad)
    table = UserTable([1], torch.zeros(1, 2, 3))
    with pytest.raises(UserError, match="3 wide but the user branch expects 8"):
        table.check_dim(8)


def test_pair_fingerprints_and_the_shot_overlap_check():
    a, b, c = b"img-a", b"img-b", b"img-c"
    assert pair_fingerprint("cap", a, b) == pair_fingerprint("cap", b, a)
    assert pair_fingerprint("cap", a, b) != pair_fingerprint("cap", a, c) != pair_fingerprint("other", a, c)
    shots = {1: [pair_fingerprint("cap", a, b)], 2: [pair_fingerprint("cap", a, c)]}
    # user 2 trains on (a, b), which only user 1 used as a shot: fine; three rows checked.
    assert check_shots_disjoint(shots, [(2, pair_fingerprint("cap", b, a)), (1, pair_fingerprint("cap", b, c)),
                                        (3, pair_fingerprint("cap", a, b))]) == 3
    with pytest.raises(ShotOverlapError, match="1 training pair.*user 1"):
        check_shots_disjoint(shots, [(1, pair_fingerprint("cap", b, a))])
    # HF `Image` columns ({"bytes", "path"}), which training reads, and a missing image: a TypeError traceback
    # after every process had loaded the 7B encoder
    assert pair_fingerprint("cap", {"bytes": a, "path": None}, b) == pair_fingerprint("cap", b, a)
    assert pair_fingerprint("cap", None, b) != pair_fingerprint("cap", a, b)


def _pool(captions, k=4, seed=0):
    """A hand-made toy pool: rendered scenes with the caption's named attributes and random backgrounds."""
    from t2i_align.toy.ppd import Pool
    from t2i_align.toy.scenes import BACKGROUNDS, Scene, render

    rng = random.Random(seed)
    images, backgrounds = [], []
    for cap in captions:
        words = cap.split()
        row_bg = [list(BACKGROUNDS)[rng.randrange(3)] for _ in range(k)]
        images.append([render(Scene(words[2], words[3], words[1], " ".join(words[6:8]), bg), rng) for bg in row_bg])
        backgrounds.append(row_bg)
    return Pool(list(captions), np.array(images, dtype=np.uint8), backgrounds, np.ones((len(captions), k), np.float32))


def _encoder():
    from t2i_align.toy.users import ToyUserEncoder

    return ToyUserEncoder(lambda ims: torch.tensor(np.array([im.mean(axis=(0, 1)) for im in ims]) / 255.0))


CAPS = ["a large red circle at the top left", "a small blue square at the bottom right",
        "a large green triangle at the top right", "a small yellow circle at the bottom left"]


def test_pair_label_adds_prompt_following_by_hand():
    from t2i_align.toy.ppd import Pool, pair_label
    from t2i_align.toy.users import ToyUser

    user = ToyUser(0, ("gray", "white", "black"))  # utilities 1, 0.5, 0
    pool = Pool(["cap"], np.zeros((1, 4, 2, 2, 3), np.uint8), [["gray", "gray", "black", "white"]],
                np.array([[1.0, 0.5, 1.0, 0.0]], np.float32))
    assert pair_label(user, pool, 0, 0, 1) == 0.5  # same background: a tie by taste alone
    assert pair_label(user, pool, 0, 0, 1, prompt_weight=0.4) == 1.0  # 1 + .4 vs 1 + .2
    assert pair_label(user, pool, 0, 2, 3, prompt_weight=0.4) == 0.0  # 0 + .4 vs .5 + 0: taste decides
    assert pair_label(user, pool, 0, 2, 3, prompt_weight=0.5) == 0.5  # .5 vs .5
    assert pair_label(user, pool, 0, 2, 3, prompt_weight=1.0) == 1.0  # 1 vs .5: prompt-following outweighs


def test_toy_ppd_data_users_disagree_on_the_same_pairs_and_shots_stay_apart(tmp_path):
    import json

    import pyarrow.parquet as pq

    from t2i_align.toy.ppd import embedding_id, fixed_pairs, write_ppd_data
    from t2i_align.toy.users import make_toy_users

    users = make_toy_users(4, seed=0)
    pairs_pool, shot_pool = _pool(CAPS, k=4, seed=1), _pool(CAPS[:2], k=6, seed=2)
    counts = write_ppd_data(tmp_path, pairs_pool, shot_pool, users[:2], users[2:], _encoder(),
                            embeddings_per_user=2, seed=0)
    rows = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    fixed = fixed_pairs(pairs_pool, 0)
    expected = sum(u.label(pairs_pool.free[p][a], pairs_pool.free[p][b]) != 0.5
                   for p, a, b in fixed for u in users[:2])
    assert counts["pairs"] == len(rows) == expected
    assert {r["user_id"] for r in rows} <= {embedding_id(u.user_id, j) for u in users[:2] for j in (0, 1)}
    by_pair = {}
    for r in rows:
        by_pair.setdefault((r["caption"], r["jpg_0"], r["jpg_1"]), set()).add(r["label_0"])
    assert any(labels == {0.0, 1.0} for labels in by_pair.values())  # two users, opposite labels, same pair
    table = UserTable.load(tmp_path / "user_table.safetensors")
    assert len(table) == 2 * 2 + 2 and table.num_tokens == 4 and table.dim == 3
    meta = json.loads((tmp_path / "users.json").read_text())
    assert len(meta["shot_fingerprints"][str(users[0].user_id)]) == 8  # 2 embeddings x 4 shots
    with pytest.raises(ShotOverlapError):  # shots from the very pairs trained on are refused
        write_ppd_data(tmp_path / "bad", pairs_pool, pairs_pool, users[:2], users[2:], _encoder(),
                       embeddings_per_user=1, seed=0)
    # ids that would overwrite each other silently: user·100 + 100 is the next user's first embedding, and a
    # held-out user with a training user's id replaced its shot fingerprints before the overlap check
    with pytest.raises(ValueError, match="embeddings_per_user 101: give 1 to 100"):
        write_ppd_data(tmp_path / "bad", pairs_pool, shot_pool, users[:2], users[2:], _encoder(),
                       embeddings_per_user=101)
    with pytest.raises(ValueError, match=f"held-out users .{users[1].user_id}. have training users' ids"):
        write_ppd_data(tmp_path / "bad", pairs_pool, shot_pool, users[:2], users[1:], _encoder())


def test_more_heldout_users_get_one_embedding_each_from_their_own_shots(tmp_path):
    import json

    from t2i_align.toy.ppd import write_heldout_users
    from t2i_align.toy.users import ToyUser, make_toy_users

    shot_pool = _pool(CAPS[:2], k=6, seed=2)
    users = [ToyUser(1000 + u.user_id, u.ranking) for u in make_toy_users(3, seed=1)]
    counts = write_heldout_users(tmp_path / "more", shot_pool, users, _encoder(), seed=1)
    assert counts["heldout_users"] == 3 and sum(counts["rankings"].values()) == 3
    table = UserTable.load(tmp_path / "more" / "user_table.safetensors")
    assert sorted(table.ids) == [1000, 1001, 1002] and table.num_tokens == 4
    meta = json.loads((tmp_path / "more" / "users.json").read_text())
    assert meta["train_users"] == {} and list(meta["heldout_users"]["1000"]) == list(users[0].ranking)
    prints = meta["shot_fingerprints"]["1001"]
    assert len(prints) == 4 and len(set(prints)) == 4  # 4 distinct pairs per user
    write_heldout_users(tmp_path / "again", shot_pool, users, _encoder(), seed=1)
    assert (tmp_path / "again" / "users.json").read_text() == (tmp_path / "more" / "users.json").read_text()
    with pytest.raises(ValueError, match="leaves 'background' free"):
        write_heldout_users(tmp_path / "x", shot_pool, make_toy_users(1, attribute="color"), _encoder(), seed=1)


def test_pools_round_trip_and_read_the_older_background_layout(tmp_path):
    import json

    from t2i_align.toy.ppd import Pool, write_ppd_data
    from t2i_align.toy.users import make_toy_users

    pool = _pool(CAPS[:2], k=2)
    pool.save(tmp_path / "p")
    back = Pool.load(tmp_path / "p")
    assert back.free == pool.free and back.attribute == "background" and np.array_equal(back.images, pool.images)
    meta = json.loads((tmp_path / "p" / "pool.json").read_text())
    (tmp_path / "p" / "pool.json").write_text(json.dumps({"captions": meta["captions"], "backgrounds": meta["free"]}))
    assert Pool.load(tmp_path / "p").free == pool.free  # pools written before the colour option
    colour_users = make_toy_users(2, seed=0, attribute="color")
    with pytest.raises(ValueError, match="leave 'background' free"):
        write_ppd_data(tmp_path / "x", pool, pool, colour_users[:1], colour_users[1:], _encoder())


def test_a_pool_stacked_from_strided_images_round_trips_pixel_exact(tmp_path):
    # The session-9 bug: np.stack of to_uint8's transposed views kept their strides, and safetensors.numpy wrote
    # the raw buffer, so the stored pool was channel-major bytes read back as pixels (a 3×3 grid of dots).
    from dataclasses import replace

    from t2i_align.gallery import to_uint8
    from t2i_align.toy.ppd import Pool

    chw = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    assert all(im.flags["C_CONTIGUOUS"] for im in to_uint8(chw))
    hwc = (chw * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # a strided view, as the old stack gave
    assert not hwc.flags["C_CONTIGUOUS"]
    pool = replace(_pool(CAPS[:2], k=2), images=hwc.reshape(2, 2, 8, 8, 3))
    pool.save(tmp_path / "p")
    assert np.array_equal(Pool.load(tmp_path / "p").images, hwc.reshape(2, 2, 8, 8, 3))
    assert not list((tmp_path / "p").glob(".*.tmp"))  # written atomically, no temporary left


def test_too_few_shots_fail_with_a_clear_message(tmp_path):
    from t2i_align.toy.pairs import jpeg_bytes, write_parquet
    from t2i_align.toy.ppd import NotEnoughShotsError, embed_shots_file, embed_users, user_shots
    from t2i_align.toy.users import Shot, ToyUser

    im = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(NotEnoughShotsError, match=r"embedding\(s\) \[7\] have \[3\] shots; each needs 4"):
        embed_users(_encoder(), {7: [Shot("c", im, im)] * 3, 8: [Shot("c", im, im)] * 4})
    one_bg = _pool(CAPS[:1], k=4)
    one_bg.free = [["white"] * 4]  # every pair a tie for every user
    with pytest.raises(NotEnoughShotsError, match="0 usable"):
        user_shots(ToyUser(0, ("white", "gray", "black")), one_bg, 4, random.Random(0))
    rows = [{"caption": CAPS[0], "jpg_0": jpeg_bytes(im), "jpg_1": jpeg_bytes(im + 200), "label_0": 1.0,
             "label_1": 0.0, "user_id": 0, "are_different": True, "has_label": True, "model_0": "m", "model_1": "m",
             "ranking_id": i} for i in range(3)]
    write_parquet(rows, tmp_path / "shots.parquet")
    with pytest.raises(NotEnoughShotsError, match="have \\[3\\] shots"):
        embed_shots_file(tmp_path / "shots.parquet", encoder=_encoder())
    write_parquet(rows + rows[:1], tmp_path / "four.parquet")
    assert embed_shots_file(tmp_path / "four.parquet", encoder=_encoder()).shape == (4, 3)
