"""Streaming shuffled pair reading: exact resume, disjoint equal shards, reading each row group ~once, bounded
memory, same items as random access, workers."""
import io
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import t2i_align.data.images as images_module
import t2i_align.data.pairs as pairs_module
import t2i_align.data.stream as stream_module
from t2i_align.data.pairs import PairDataset
from t2i_align.data.stream import StreamingPairSource, make_blocks, plan_epoch

from test_data_pairs import image_bytes, row, write_pairs


def noise_jpeg(seed: int, size: int = 24) -> bytes:
    """Incompressible image bytes, so a file's size is mostly its images (as in Pick-a-Pic)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def many_groups(tmp_path):
    """60 pairs in 15 row groups of 4, no ties. Groups are cut into blocks only above 1/8 of a process's share:
    not on 1 or 2 processes (share 60 or 30: blocks of <= 8 or 4 pairs), but on 3 (share 20: <= 3 pairs)."""
    rows = [row(caption=f"c{i}", jpg_0=noise_jpeg(2 * i), jpg_1=noise_jpeg(2 * i + 1)) for i in range(60)]
    return write_pairs(tmp_path / "p.parquet", rows, row_group_size=4)


def indices(batch):
    return None if batch is None else batch["index"].tolist()


def test_make_blocks_cuts_large_groups_into_near_equal_blocks():
    file = np.array([0, 0, 0, 0, 0, 1, 1])
    group = np.zeros(7, dtype=int)
    # group (file 0): 5 rows, max 2 -> ceil(5/2) = 3 blocks at round(0, 5/3, 10/3, 5) = 0, 2, 3, 5
    assert make_blocks(file, group, max_rows=2).tolist() == [[0, 2], [2, 3], [3, 5], [5, 7]]
    assert make_blocks(file, group, max_rows=5).tolist() == [[0, 5], [5, 7]]


def test_plan_serves_a_share_once_and_shuffles_only_within_windows():
    blocks = np.array([[0, 10], [10, 20], [20, 30]])
    plan = plan_epoch(blocks, share=30, items=28, seed=0, epoch=0, rank=0, window=8)
    assert sorted(plan.stream.tolist()) == sorted(plan.order.tolist()) and len(set(plan.order.tolist())) == 28
    for start in range(0, 28, 8):  # each window of the serving order = the same window of the reading order
        assert sorted(plan.order[start:start + 8].tolist()) == sorted(plan.stream[start:start + 8].tolist())
    runs = [plan.stream[i:i + 10].tolist() for i in (0, 10)]
    assert all(r == list(range(r[0], r[0] + 10)) for r in runs)  # whole row groups read front to back
    again = plan_epoch(blocks, share=30, items=28, seed=0, epoch=0, rank=0, window=8)
    assert again.order.tolist() == plan.order.tolist()
    assert plan_epoch(blocks, 30, 28, 0, 1, 0, 8).order.tolist() != plan.order.tolist()


def test_resume_after_any_number_of_micro_batches_gives_the_same_batches(tmp_path):
    rows = [row(caption=f"c{i}", jpg_0=image_bytes((i, 0, 0), size=(8, 8)),
                label_0=0.5 if i % 7 == 3 else float(i % 2)) for i in range(45)]
    rows[9]["jpg_1"] = b"corrupt"  # a batch of 1 holding it comes back None, and counts as a micro-batch
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows, row_group_size=6), resolution=8, flip="independent")
    source = StreamingPairSource(ds, batch_size=1, seed=5, rank=0, world=1, window=7)
    per_epoch = source.batches_per_epoch
    assert per_epoch == 39  # 45 rows - 6 ties (i = 3, 10, 17, 24, 31, 38)
    full = list(itertools.islice(source.micro_batches(0), 3 * per_epoch))
    assert sum(b is None for b in full) == 3  # the corrupt pair, once per epoch
    for start in (1, 6, 7, 20, per_epoch - 1, per_epoch, per_epoch + 10, 2 * per_epoch + 8):
        resumed = StreamingPairSource(ds, batch_size=1, seed=5, rank=0, world=1, window=7)
        got = list(itertools.islice(resumed.micro_batches(start), 3 * per_epoch - start))
        assert [indices(b) for b in got] == [indices(b) for b in full[start:]], start
        for a, b in zip(got, full[start:]):
            assert a is None or torch.equal(a["pixels_l"], b["pixels_l"])  # same flips: same epoch draws


def test_processes_read_disjoint_shares_with_equal_batch_counts(many_groups):
    ds = PairDataset(many_groups, resolution=8)
    # 60 pairs on 3 processes: share 20 each, batch 3 -> 6 micro-batches (18 pairs) per process and epoch
    sources = [StreamingPairSource(ds, batch_size=3, seed=1, rank=r, world=3, window=5) for r in range(3)]
    assert {s.batches_per_epoch for s in sources} == {6}
    epochs = []
    for epoch in range(2):
        served = [[i for b in s.raw_batches(epoch) for i, _, _ in b] for s in sources]
        assert all(len(x) == 18 for x in served)
        flat = sum(served, [])
        assert len(set(flat)) == 54  # disjoint across processes, no repeats within one
        epochs.append(served)
    assert epochs[0] != epochs[1]


def test_items_equal_random_access_items_of_the_same_epoch(many_groups):
    ds = PairDataset(many_groups, resolution=16, crop="random", flip="independent", prompt_dropout=0.3, seed=2)
    source = StreamingPairSource(ds, batch_size=4, seed=2, rank=0, world=1, window=16)
    batches = list(itertools.islice(source.micro_batches(0), source.batches_per_epoch + 2))
    reference = PairDataset(many_groups, resolution=16, crop="random", flip="independent", prompt_dropout=0.3, seed=2)
    for k, batch in enumerate(batches):
        reference.set_epoch(k // source.batches_per_epoch)
        for j, index in enumerate(batch["index"].tolist()):
            item = reference[index]
            assert torch.equal(batch["pixels_w"][j], item["pixels_w"]) and batch["caption"][j] == item["caption"]
            assert tuple(batch["crop_top_left_l"][j].tolist()) == item["crop_top_left_l"]


class CountingFile(io.RawIOBase):
    """A file object that counts the bytes read through it (what pyarrow reads, page cache or not)."""

    total = 0

    def __init__(self, path):
        self.f = open(path, "rb")

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        CountingFile.total += n
        return n

    def close(self):
        self.f.close()
        super().close()


class CountingParquet:
    @staticmethod
    def ParquetFile(path, **kwargs):
        return pq.ParquetFile(CountingFile(path), **kwargs)


def test_a_shuffled_epoch_reads_the_file_about_once(many_groups, monkeypatch):
    """Regression (issue 10): the shuffled uncached path read a whole row group for every item."""
    size = many_groups.stat().st_size
    monkeypatch.setattr(stream_module, "pq", CountingParquet)
    monkeypatch.setattr(pairs_module, "pq", CountingParquet)
    monkeypatch.setattr(images_module, "pq", CountingParquet)  # the random-access reader's row groups
    ds = PairDataset(many_groups, resolution=8)
    source = StreamingPairSource(ds, batch_size=4, seed=0, rank=0, world=1, window=16)
    CountingFile.total = 0
    served = sum(len(b) for b in source.raw_batches(0))
    assert served == 60 and source.reader.rows_read == 60  # 15 whole groups, each read once
    assert CountingFile.total <= 1.2 * size
    CountingFile.total = 0  # the old path, random access in the same order: one row group per item
    for index in source.plan(0).order.tolist():
        ds.image_bytes(index)
    assert CountingFile.total > 2 * size  # ~ group size (4) x, less when neighbours share a group


def test_memory_holds_at_most_one_window_of_rows(many_groups):
    ds = PairDataset(many_groups, resolution=8)
    source = StreamingPairSource(ds, batch_size=2, seed=3, rank=0, world=1, window=8)
    source.reader.read_batch = 4
    served = 0
    for batch in source.raw_batches(0):
        served += len(batch)
        # read but not yet served <= one window + one record batch (8 + 4 - 1 = 11 rows)
        assert source.reader.rows_read - served <= 11
    assert served == 60


def test_workers_give_the_same_batches(many_groups):
    ds = PairDataset(many_groups, resolution=8, flip="independent", seed=4)
    plain = StreamingPairSource(ds, batch_size=4, seed=4, rank=0, world=1, window=8)
    workers = StreamingPairSource(ds, batch_size=4, seed=4, rank=0, world=1, window=8, num_workers=2)
    a = list(itertools.islice(plain.micro_batches(3), 14))
    b = list(itertools.islice(workers.micro_batches(3), 14))
    assert [indices(x) for x in a] == [indices(x) for x in b]
    assert all(torch.equal(x["pixels_w"], y["pixels_w"]) for x, y in zip(a, b))


def test_one_big_row_group_is_cut_so_processes_swap_data_between_epochs(tmp_path):
    rows = [row(caption=f"c{i}", jpg_0=image_bytes((i, 0, 0), size=(8, 8))) for i in range(32)]
    ds = PairDataset(write_pairs(tmp_path / "p.parquet", rows), resolution=8)  # one row group
    source = StreamingPairSource(ds, batch_size=2, seed=0, rank=0, world=2, window=64)
    assert len(source.blocks) == 16  # share 16 -> blocks of <= ceil(16 / 8) = 2 pairs
    seen = [{i for b in source.raw_batches(epoch) for i, _, _ in b} for epoch in range(3)]
    assert all(len(s) == 16 for s in seen) and len(set.union(*seen)) > 16
