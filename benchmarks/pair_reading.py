"""Pair reading at Pick-a-Pic scale: pairs/s, bytes read per pair and peak RSS of each way to read pair parquet.

Writes synthetic Pick-a-Pic-v2-format parquet files (the columns of `t2i_align.data.listings.PICKAPIC_COLUMNS`; two
512 px JPEGs of ~50-100 KB per row, ~10 % ties, ~14 pairs per caption, row groups of 100 rows as HF `datasets`
writes image data) of each size given, then measures, each in its own process (so peak RSS is its own):

- sequential: one pass in file order (pyarrow record batches) -> decode + resize/crop to 512 px (the baseline);
- streaming shuffled: `StreamingPairSource` (this project's uncached training path), same decode work;
- random access (before): `dataset[i]` in a shuffled order, the uncached path before streaming (few pairs only);
- reading only: the same two orders without decoding images (the reading path alone, over the whole file);
- cache build: `build_or_load_cache` on the first --cache-pairs pairs, with stand-in encoders (8x average pool
  for the VAE, zeros [77, 768] for the text encoder: reading, decoding, writing safetensors; no VAE cost);
- HF datasets: `load_dataset("parquet", data_files=...)` offline, as diffusers' DPO script loads data (it first
  copies the parquet into an Arrow cache, timed apart), then rows in a shuffled order, same decode work.

Bytes read = the change in /proc/self/io `rchar`: bytes returned by read() calls, from disk or page cache alike.
Memory-mapped reads (HF datasets' Arrow cache) do not appear there. Timings on a shared machine are noisy.

    python benchmarks/pair_reading.py [--dir /tmp/pair_reading] [--sizes-gb 1 2] [--pairs 1536] [--keep]

Prints a Markdown table and writes benchmarks/results/pair_reading.json; deletes the generated files at the end.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "pair_reading.json"
ROW_GROUP = 100
POOL = 64
MODES = ("sequential", "shuffled", "random-access", "read-sequential", "read-shuffled", "cache", "hf")


# ---------------------------------------------------------------------------------------------- the data

def jpeg_pool(rng: np.random.Generator) -> list:
    """POOL distinct 512 px JPEGs of 50-100 KB: smooth random colour fields plus sensor-like noise."""
    from PIL import Image

    pool = []
    for _ in range(POOL):
        low = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((512, 512), Image.BICUBIC)).astype(np.float32)
        noisy = np.clip(smooth + rng.normal(0, rng.uniform(5, 10), smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def unique_jpeg(base: bytes, tag: int) -> bytes:
    """`base` with a JPEG comment segment after SOI: a valid JPEG whose bytes no other row repeats."""
    payload = f"row {tag}".encode()
    return base[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + base[2:]


def write_pairs(path: Path, target_bytes: int, seed: int = 0) -> dict:
    """Row groups of ROW_GROUP rows until the file holds ~target_bytes of images; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2i_align.data.listings import PICKAPIC_COLUMNS

    rng = np.random.default_rng(seed)
    pool = jpeg_pool(rng)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("user_id", pa.int64()),
                        ("are_different", pa.bool_()), ("has_label", pa.bool_()), ("model_0", pa.string()),
                        ("model_1", pa.string()), ("ranking_id", pa.int64())])
    assert tuple(schema.names) == PICKAPIC_COLUMNS
    rows, image_bytes = 0, 0
    with pq.ParquetWriter(path, schema, use_dictionary=["caption", "model_0", "model_1"]) as writer:
        while image_bytes < target_bytes:
            ids = np.arange(rows, rows + ROW_GROUP)
            jpg_0 = [unique_jpeg(pool[rng.integers(POOL)], 2 * i) for i in ids]
            jpg_1 = [unique_jpeg(pool[rng.integers(POOL)], 2 * i + 1) for i in ids]
            label = np.where(rng.random(ROW_GROUP) < 0.1, 0.5, rng.integers(0, 2, ROW_GROUP).astype(float))
            table = pa.table({
                "caption": [f"prompt {i // 14}: a photograph of a red fox in fresh snow, golden hour" for i in ids],
                "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label, "label_1": 1.0 - label,
                "user_id": ids % 997, "are_different": [True] * ROW_GROUP, "has_label": [True] * ROW_GROUP,
                "model_0": ["sdxl"] * ROW_GROUP, "model_1": ["sd21"] * ROW_GROUP, "ranking_id": ids}, schema=schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
            rows += ROW_GROUP
            image_bytes += sum(map(len, jpg_0)) + sum(map(len, jpg_1))
    return {"rows": rows, "image_bytes": image_bytes, "file_bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------ one measurement

def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sequential(ds, limit, decode: bool):
    """File order through the same reader, DataLoader and collate as the shuffled path: only the order differs."""
    from torch.utils.data import DataLoader

    from t2i_align.data.pairs import collate_pairs
    from t2i_align.data.stream import RowReader, _RawPairs

    rows = RowReader(ds).rows(np.arange(min(limit, len(ds))))
    if not decode:
        return [index for index, _, _ in rows]
    batches = iter(lambda: list(itertools.islice(rows, 8)), [])
    loader = DataLoader(_RawPairs(ds), batch_sampler=batches, collate_fn=collate_pairs)
    return [i for batch in loader for i in batch["index"].tolist()]


def run_shuffled(ds, limit, decode: bool):
    """This project's uncached training path (window 512, batches of 8)."""
    from t2i_align.data.stream import StreamingPairSource

    source = StreamingPairSource(ds, batch_size=8, seed=0, rank=0, world=1)
    done = []
    batches = source.micro_batches(0) if decode else source.raw_batches(0)
    for batch in batches:
        done += batch["index"].tolist() if decode else [i for i, _, _ in batch]
        if len(done) >= limit:
            break
    return done


def run_random_access(ds, limit):
    order = np.random.default_rng(0).permutation(len(ds))[:limit].tolist()
    for i in order:
        ds[i]
    return order


def run_cache(ds, limit, folder: Path):
    import torch
    import torch.nn.functional as F

    from t2i_align.data.cache import build_or_load_cache

    def prompts(captions):
        return {"prompt_embeds": torch.zeros(len(captions), 77, 768)}

    build_or_load_cache(ds, lambda pixels: F.avg_pool2d(pixels, 8), prompts, folder / "cache", {"model": "stand-in"})
    return list(range(len(ds)))


def run_hf(ds, limit, folder: Path, result: dict):
    """diffusers' train_diffusion_dpo.py: load_dataset, then map-style rows in a shuffled order."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from datasets import load_dataset

    from t2i_align.data.images import decode_rgb, prepare_image

    start, read0 = time.perf_counter(), rchar()
    data = load_dataset("parquet", data_files=str(ds.files[0]), split="train", cache_dir=str(folder / "hf"))
    result.update(hf_prepare_s=time.perf_counter() - start, hf_prepare_read_bytes=rchar() - read0,
                  hf_cache_bytes=sum(p.stat().st_size for p in (folder / "hf").rglob("*") if p.is_file()))
    order = np.random.default_rng(0).permutation(len(data))[:limit].tolist()
    result["start"], result["read0"] = time.perf_counter(), rchar()
    for i in order:
        row = data[i]
        for key in ("jpg_0", "jpg_1"):
            prepare_image(decode_rgb(row[key]), 512, "center", False, 0.0, 0.0)
    return order


def measure(mode: str, path: Path, limit: int, scratch: Path) -> dict:
    from t2i_align.data.pairs import PairDataset

    start_rss = peak_rss_mib()
    ds = PairDataset(path, resolution=512, max_pairs=limit if mode == "cache" else 0)
    result = {"mode": mode, "rss_after_metadata_mib": peak_rss_mib(), "rss_after_imports_mib": start_rss}
    read0, start, cpu0 = rchar(), time.perf_counter(), time.process_time()
    if mode in ("sequential", "read-sequential"):
        done = run_sequential(ds, limit, decode=mode == "sequential")
    elif mode in ("shuffled", "read-shuffled"):
        done = run_shuffled(ds, limit, decode=mode == "shuffled")
    elif mode == "random-access":
        done = run_random_access(ds, limit)
    elif mode == "cache":
        done = run_cache(ds, limit, scratch)
    else:
        done = run_hf(ds, limit, scratch, result)
        start, read0 = result.pop("start"), result.pop("read0")
    seconds, cpu, read = time.perf_counter() - start, time.process_time() - cpu0, rchar() - read0
    pairs = len(done)
    result.update(pairs=pairs, seconds=seconds, pairs_per_s=pairs / seconds, pairs_per_cpu_s=pairs / max(cpu, 1e-9),
                  read_bytes_per_pair=read / pairs, peak_rss_mib=peak_rss_mib())
    return result


# ------------------------------------------------------------------------------------------- driver

def run_in_child(mode: str, path: Path, limit: int, scratch: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--file", str(path), "--pairs", str(limit),
           "--scratch", str(scratch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def limits(args, mode: str, rows: int) -> int:
    if mode.startswith("read-"):
        return rows  # the reading path alone is fast: the whole file
    return {"random-access": args.random_access_pairs, "cache": args.cache_pairs}.get(mode, args.pairs)


LABELS = {"sequential": "sequential pass (file order)", "shuffled": "**streaming shuffled (uncached training)**",
          "random-access": "random access, shuffled (uncached path before)",
          "read-sequential": "reading only, file order", "read-shuffled": "reading only, streaming shuffled",
          "cache": "cache build (first {pairs} pairs, stand-in encoders)"}


def label(r: dict) -> str:
    if r["mode"] == "hf":
        return (f"HF `datasets`, shuffled (after a {r['hf_prepare_s']:.0f} s, {r['hf_cache_bytes'] / 1e9:.1f} GB "
                "Arrow copy)")
    return LABELS[r["mode"]].format(pairs=r["pairs"])


def table(results: list) -> str:
    lines = ["| file | reader | pairs | pairs/s | pairs per CPU-s | read / pair | ÷ pair's own bytes | "
             "peak RSS (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mmap = r["mode"] == "hf"
        read = "n/a (mmap)" if mmap else f"{r['read_bytes_per_pair'] / 1e3:,.0f} kB"
        ratio = "n/a" if mmap else f"{r['read_bytes_per_pair'] / r['own_bytes_per_pair']:.2f}"
        lines.append(f"| {r['file_gb']:g} GB | {label(r)} | {r['pairs']} | {r['pairs_per_s']:.1f} | "
                     f"{r['pairs_per_cpu_s']:.1f} | {read} | {ratio} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where to work: in a new folder inside it, removed at the end unless --keep")
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--pairs", type=int, default=1536,
                        help="pairs decoded per measurement (3 shuffle windows of 512: whole windows are read)")
    parser.add_argument("--cache-pairs", type=int, default=600, help="pairs in the cache-build subset")
    parser.add_argument("--random-access-pairs", type=int, default=40)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, Path(args.file), args.pairs, Path(args.scratch))))
        return
    need = 2.2 * sum(args.sizes_gb) * 1e9  # the files plus HF datasets' Arrow copy of one
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"error: {args.dir} has {free / 1e9:.1f} GB free; this needs ~{need / 1e9:.1f} GB (pass --dir)")
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="pair_reading-"))  # only what this run made is removed
    results, files = [], {}
    try:
        for size in args.sizes_gb:
            path = folder / f"pairs-{size:g}gb.parquet"
            start = time.perf_counter()
            files[size] = {**write_pairs(path, int(size * 1e9)), "write_s": time.perf_counter() - start}
            print(f"wrote {path}: {files[size]}", file=sys.stderr)
            for mode in args.modes:
                scratch = Path(tempfile.mkdtemp(dir=folder))
                try:
                    r = run_in_child(mode, path, limits(args, mode, files[size]["rows"]), scratch)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                # a pair's own bytes: the file's mean (the pairs measured are a sample of its rows)
                own = files[size]["image_bytes"] / files[size]["rows"]
                results.append({**r, "file_gb": size, "own_bytes_per_pair": own})
                print(json.dumps(results[-1]), file=sys.stderr)
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    from t2i_align.files import write_text_atomic

    write_text_atomic(RESULTS, json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "files": files,
                                           "row_group_rows": ROW_GROUP, "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
