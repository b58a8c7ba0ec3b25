"""The latent cache built by 1 and by several processes: seconds to build, pairs/s, and whether the caches agree.

Every process of a run encodes a contiguous share of the pairs (t2i_align/data/cache_build.py); before, the main
process encoded them all while the others waited. Here: toy-world pairs (ground-truth renders vs changed scenes,
JPEG, --size px) cached with the toy pipeline's real VAE and text encoder on the CPU, one thread per process,
processes joined over gloo exactly as `accelerate launch` joins them (a barrier and a broadcast from the main
process). Each process count builds into its own cache folder; the rows, captions and prompt embeddings of every
build are compared with the one-process build (latents are VAE posterior samples, so they are not compared).

    python benchmarks/cache_build_scaling.py [--pairs 3000] [--processes 1 2] [--size 32]

Prints a Markdown table and writes benchmarks/results/cache_build_scaling_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_pairs(path: Path, n: int, size: int) -> Path:
    from t2i_align.toy.pairs import jpeg_bytes, write_parquet
    from t2i_align.toy.scenes import noisy_scene, render, short_caption, split_scenes

    rng, scenes = random.Random(0), split_scenes()[0]
    rows = []
    for i in range(n):
        scene = rng.choice(scenes)
        wrong = noisy_scene(scene, rng, 1.0, keep=())
        rows.append({"caption": short_caption(scene), "jpg_0": jpeg_bytes(render(scene, rng, size)),
                     "jpg_1": jpeg_bytes(render(wrong, rng, size)), "label_0": 1.0, "label_1": 0.0, "user_id": 0,
                     "are_different": True, "has_label": True, "model_0": "render", "model_1": "render",
                     "ranking_id": i})
    write_parquet(rows, path)
    return path


def build(rank: int, world: int, port: int, data: str, cache: str, size: int, out: str) -> None:
    """One process: join the group, load the toy encoders, build the cache together, rank 0 writes the time."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from t2i_align.config import load_config
    from t2i_align.data.cache import build_or_load_cache
    from t2i_align.data.cache_build import Team
    from t2i_align.data.pairs import PairDataset
    from t2i_align.data.sources import _cache_encoders
    from t2i_align.models import load_components

    def share(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(value):
        every = [None] * world
        dist.all_gather_object(every, value)
        return every
    components = load_components(load_config(None, ["model.pretrained=toy"]).model)
    images, prompts = _cache_encoders(components, "cpu")
    dataset = PairDataset(data, resolution=size)
    team = Team(rank, world, dist.barrier, share, gather)
    dist.barrier()
    start = time.perf_counter()
    cached = build_or_load_cache(dataset, images, prompts, cache, {"model": "toy"}, batch_size=32, team=team)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        from t2i_align.files import write_text_atomic  # a result file whole or not at all
        write_text_atomic(Path(out), json.dumps({"seconds": seconds, "folder": str(cached.folder)}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def same_rows(a, b) -> bool:
    """Rows, captions and prompt embeddings equal (not the latents: posterior samples)."""
    if len(a) != len(b) or a.captions != b.captions:
        return False
    for i in range(len(a)):
        x, y = a[i], b[i]
        if x["caption"] != y["caption"] or not torch.equal(x["prompt_embeds"], y["prompt_embeds"]):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=32, help="image side in px (the toy model's resolution)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache_build_scaling_cpu.json"))
    args = parser.parse_args()
    from t2i_align.data.cache import CachedPairDataset

    rows, folders = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.parquet", args.pairs, args.size)
        for world in args.processes:
            out = Path(tmp) / f"time-{world}.json"
            torch.multiprocessing.spawn(build, args=(world, free_port(), str(data), f"{tmp}/cache-{world}",
                                                     args.size, str(out)), nprocs=world)
            result = json.loads(out.read_text())
            folders[world] = CachedPairDataset(result["folder"])
            rows.append({"processes": world, "seconds": round(result["seconds"], 2),
                         "pairs_per_s": round(args.pairs / result["seconds"], 1),
                         "same_rows_as_one_process": same_rows(folders[args.processes[0]], folders[world])})
    machine = (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
               f"one thread per process")
    print(f"{args.pairs} toy pairs at {args.size} px, toy VAE + text encoder, {machine}\n")
    print("| processes | seconds | pairs/s | rows as one process |\n|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['seconds']} | {r['pairs_per_s']} | {r['same_rows_as_one_process']} |")
    from t2i_align.files import write_text_atomic  # a result file whole or not at all
    write_text_atomic(Path(args.out), json.dumps({"pairs": args.pairs, "size": args.size, "machine": machine,
                                                  "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
