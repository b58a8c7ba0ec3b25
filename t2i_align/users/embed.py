"""`python -m t2i_align.users embed`: PPD's stage 1 over a Pick-a-Pic-format pair set, written as a user table.

Per user (Dang et al., CVPR 2025, arXiv 2501.06655; official `pick_a_pick_user_emb.py`): the user's pairs without
ties or identical images (the official filter is `are_different and has_label`, the preferred image its
`best_image_uid`; whether a tie passes it there could not be confirmed: here ties never describe a taste),
shuffled (seeded per user, so the choice does not depend on sharding), the first `num_shots` that decode become
the shots of one embedding (the official script cuts all of a user's pairs into chunks of 4 and embeds up to
`per_user` of them; we make one embedding per user, what the table and the training loop look up by `user_id`).
Users with fewer usable pairs are skipped and counted.

Users are dealt over processes (`accelerate launch -m t2i_align.users embed ...`, as the official script shards
users over 8 GPUs); each finished user is written at once to OUT/parts/ (one safetensors file, atomically), so a
stopped run resumes where it was. When every process is done the main process merges the parts into
OUT/user_table.safetensors (fp16, [L + 1, D] per user) and OUT/users.json (per user: the generated profile text
and the fingerprints of the pairs used as shots). Before training, `python -m t2i_align.users check-shots
--shots OUT/users.json --pairs TRAIN` verifies that no shot is among that user's training pairs: embed from pairs
you do not train on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.images import DECODE_ERRORS, decode_rgb
from ..data.pairs import PairDataset
from ..errors import UserError, one_line
from ..files import save_safetensors_atomic, write_json_atomic
from .llava import LabelledPair
from .table import UserTable
from .training import check_shots_disjoint, id_types, pair_fingerprint

PARTS = "parts"
USERS_JSON = "users.json"
logger = logging.getLogger(__name__)


def _by_user(dataset: PairDataset) -> Dict[Any, List[int]]:
    """{user id: its rows}; ids as a user table keeps them (ints or text): a whole float (7.0, what pandas makes of
    an int column with gaps) is taken as the int, any other id refused before anything is embedded."""
    if dataset.user_ids is None:
        raise ValueError("the pairs have no user_id column; PPD embeds users from their own labelled pairs "
                         "(Pick-a-Pic v2 has user_id)")
    rows: Dict[Any, List[int]] = {}
    for index, user in enumerate(dataset.user_ids):
        if user is None or user != user:  # no rater (None, NaN): it cannot describe anyone's taste
            continue
        if isinstance(user, float) and user.is_integer():
            user = int(user)
        if isinstance(user, bool) or not isinstance(user, (int, str)):
            raise UserError(f"row {index}: user_id {user!r} ({type(user).__name__}); a user table's ids are ints "
                            "or text: convert the column")
        rows.setdefault(user, []).append(index)
    return rows


def pick_shots(dataset: PairDataset, rows: Sequence[int], user: Any, num_shots: int, seed: int
               ) -> Tuple[List[LabelledPair], List[str], int]:
    """Up to `num_shots` decodable pairs with two different images from `rows`, in a seeded per-user order;
    (shots, their fingerprints, rows skipped as identical or undecodable on the way)."""
    order = list(rows)
    random.Random(f"{seed}:{json.dumps(user)}").shuffle(order)
    shots, prints, skipped = [], [], 0
    for index in order:
        winner, loser = dataset.image_bytes(index)
        if winner == loser:  # PPD keeps are_different rows only
            skipped += 1
            continue
        try:
            images = decode_rgb(winner), decode_rgb(loser)
        except DECODE_ERRORS:  # an undecodable row is skipped, the next pair taken
            skipped += 1
            continue
        shots.append(LabelledPair(dataset.caption(index), *images))
        prints.append(pair_fingerprint(dataset.caption(index), winner, loser))
        if len(shots) == num_shots:
            break
    return shots, prints, skipped


def part_path(out: Path, user: Any) -> Path:
    return out / PARTS / f"user-{hashlib.sha1(json.dumps(user).encode()).hexdigest()[:20]}.safetensors"


def write_part(path: Path, user: Any, embedding: torch.Tensor, text: str, prints: List[str]) -> None:
    """One user's result, via a temporary file and a rename (complete or absent): in fp16, or in fp32 where some
    value is beyond fp16's 65504 (the merged table is then fp32: no --dtype could make such a user fit fp16)."""
    meta = {"user_id": json.dumps(user), "text": text, "shots": json.dumps(prints)}
    half = embedding.to(torch.float16)
    stored = half if bool(torch.isfinite(half).all()) else embedding.float()
    save_safetensors_atomic(path, {"embedding": stored.contiguous()}, meta)


def read_part(path: Path) -> Tuple[Any, torch.Tensor, Dict[str, Any]]:
    """(user id, embedding, {text, shots}) of a part; UserError naming a damaged one (a torn copy)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            # cloned: the tensor may map the file, which a resume can replace
            return json.loads(meta["user_id"]), f.get_tensor("embedding").clone(), {"text": meta["text"],
                                                                            "shots": json.loads(meta["shots"])}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is a damaged user part ({one_line(err)[:200]}): delete it and run the same command "
                        "again, which embeds that user anew") from None


def _done(path: Path) -> bool:
    """A part whose header reads (safetensors checks it against the file's size): a torn one, from a crash or a
    bad copy, is embedded again."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except (SafetensorError, OSError) as err:
        logger.warning("%s is a damaged user part (%s): embedding that user again", path, one_line(err)[:200])
        return False
    return True


def embed_users(encoder, dataset: PairDataset, out: Path, num_shots: int = 4, seed: int = 0, rank: int = 0,
                world: int = 1, max_users: int = 0, progress: bool = True) -> Dict[str, int]:
    """This process's share of the users (every world-th of the sorted ids, from `rank`); finished users are
    skipped. Returns counts: users embedded now, already done, skipped for too few usable pairs, and pair rows
    skipped (identical images or undecodable)."""
    from tqdm.auto import tqdm

    by_user = _by_user(dataset)
    users = sorted(by_user, key=json.dumps)
    users = (users[:max_users] if max_users else users)[rank::world]
    counts = {"embedded": 0, "already_done": 0, "too_few_pairs": 0, "rows_skipped": 0, "failed": 0}
    for user in tqdm(users, desc=f"embed users (process {rank})", disable=not progress):
        path = part_path(out, user)
        if _done(path):
            counts["already_done"] += 1
            continue
        shots, prints, skipped = pick_shots(dataset, by_user[user], user, num_shots, seed)
        counts["rows_skipped"] += skipped
        if len(shots) < num_shots:
            counts["too_few_pairs"] += 1
            continue
        counts[_embed_one(encoder, shots, path, user, prints)] += 1
    return counts


def _embed_one(encoder, shots, path: Path, user: Any, prints: List[str]) -> str:
    """One user embedded and written; "failed" (with a warning) for an out-of-memory error or an embedding that is
    not finite (NaN or inf in --dtype), neither written: the others go on, and a resumed run tries that user again."""
    try:
        result = encoder.encode_with_text(shots)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return _failed(user, f"out of memory ({str(err).splitlines()[0][:200]})")
    if not bool(torch.isfinite(result.embedding).all()):
        return _failed(user, f"its embedding is not finite (NaN or inf in {result.embedding.dtype}): try --dtype "
                             "fp32 or bf16, whose range is wider")
    write_part(path, user, result.embedding, result.text, prints)
    return "embedded"


def _failed(user: Any, why: str) -> str:
    logger.warning("user %r not embedded: %s", user, why)
    return "failed"


def merge_parts(out: Path, handled: Optional[int] = None) -> Dict[str, Any]:
    """OUT/parts/* -> OUT/user_table.safetensors and OUT/users.json; returns the summary. `handled`: the users all
    processes report embedded or already done; fewer parts here means some were written where this process
    cannot see them (machines without a shared file system), and the table would silently lack those users."""
    parts = sorted((out / PARTS).glob("user-*.safetensors"))
    if handled is not None and len(parts) < handled:
        raise UserError(f"{out / PARTS} holds {len(parts)} user parts, but the processes embedded {handled}: "
                        "the others wrote theirs elsewhere. Put --out on a file system every machine mounts")
    if not parts:
        raise ValueError(f"no embedded users under {out / PARTS}: every user had too few usable pairs?")
    embeddings, info = {}, {}
    for path in parts:
        user, embedding, meta = read_part(path)
        embeddings[user], info[json.dumps(user)] = embedding, meta
    wide = [user for user, e in embeddings.items() if e.dtype == torch.float32]  # write_part: beyond fp16
    if wide:
        logger.warning("the embeddings of %d user(s) (first: %r) exceed fp16's range (65504), so the table is fp32: "
                       "train and sample PPD with bf16 or fp32 (train.mixed_precision, model.weight_dtype), where "
                       "fp16 turns them to inf", len(wide), wide[0])
    table = UserTable.from_dict(embeddings)
    table.save(out / "user_table.safetensors")
    write_json_atomic(out / USERS_JSON, {"users": info})
    return {"users": len(table), "tokens": table.num_tokens, "width": table.dim}


def load_shots(path: str) -> Dict[Any, List[str]]:
    """users.json -> {user id: shot fingerprints}; UserError naming the file and the shape `embed` writes."""
    if not Path(path).is_file():  # was "No such file or directory: PATH", naming no flag
        raise UserError(f"--shots {path} does not exist: give the users.json that `embed` wrote in its --out")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise _not_users_json(path, f"not readable JSON ({one_line(err)})") from None
    if isinstance(data, dict) and "shot_fingerprints" in data:  # the toy's pair set checks its own shots
        raise _not_users_json(path, "it is a toy PPD set's users.json, whose build already checked its shots")
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise _not_users_json(path, 'no "users" object at its top level')
    return dict(_user_shots(path, key, entry) for key, entry in data["users"].items())


# what merge_parts writes: the user id as JSON (7, "ab") for key, the pair fingerprints of its shots
_SHAPE = '{"users": {"7": {"text": "...", "shots": ["<pair fingerprint>", ...]}, ...}}'


def _not_users_json(path: str, why: str) -> UserError:
    return UserError(f"{path} is not a users.json written by `python -m t2i_align.users embed`: {why}; expected "
                     f"{_SHAPE}")


def _user_shots(path: str, key: str, entry: Any) -> Tuple[Any, List[str]]:
    try:
        user = json.loads(key)
    except ValueError:
        user = None
    if isinstance(user, bool) or not isinstance(user, (int, str)):
        raise _not_users_json(path, f"user key {key!r} is not an int or a quoted text id in JSON")
    shots = entry.get("shots") if isinstance(entry, dict) else None
    if not isinstance(shots, list) or not all(isinstance(s, str) for s in shots):
        raise _not_users_json(path, f'user {key} has no "shots" list of fingerprint strings')
    return user, shots


def _pair_data(pairs: str) -> PairDataset:
    if not Path(pairs).exists():  # PairDataset's message tells a training run to set data.path
        raise UserError(f"--pairs {pairs} does not exist: give a Pick-a-Pic-format parquet file or folder with a "
                        "user_id column")
    return PairDataset(pairs, resolution=8)


def check_shots(shots_json: str, pairs: str) -> int:
    """Raise ShotOverlapError if a training pair of `pairs` was one of its user's shots; returns rows checked."""
    shots = load_shots(shots_json)
    dataset = _pair_data(pairs)
    if dataset.user_ids is None:
        raise ValueError(f"{pairs} has no user_id column")
    from tqdm.auto import tqdm

    ids = tqdm(enumerate(dataset.user_ids), total=len(dataset), desc="check shots against training pairs")
    rows = ((user, pair_fingerprint(dataset.caption(i), *dataset.image_bytes(i))) for i, user in ids if user in shots)
    checked = check_shots_disjoint(shots, rows)
    if checked == 0 and id_types(shots) != id_types(dataset.user_ids):  # 7 vs "7": nothing could match
        raise UserError(f"no pair of {pairs} belongs to a user of {shots_json}: their ids are "
                        f"{'/'.join(id_types(dataset.user_ids))}, the embedded users' "
                        f"{'/'.join(id_types(shots))} (e.g. {', '.join(repr(u) for u in list(shots)[:3])}), so "
                        "nothing was checked; write both with one id type")
    return checked


PARTS_SETTINGS = "settings.json"


def check_parts_settings(out: Path, settings: Dict[str, Any], record: bool = True) -> None:
    """OUT/parts/ holds users embedded with these settings only: recorded by the first run (`record`), and a run
    with other settings (model, pairs and their files' sizes and rows, shots, seed, text length, dtype) is refused,
    not mixed into the same table. `pairs_files` is compared only where recorded (runs before session 30)."""
    path = out / PARTS / PARTS_SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if before.get(k) != v and (k != "pairs_files" or k in before)]
        if changed:
            raise UserError(f"{out / PARTS} holds users embedded with other settings ({'; '.join(changed)}): give "
                            "another --out, or the same settings to continue that run")
        return
    if record:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)



def _pair_files(files) -> List[List[Any]]:
    """[path, size, rows] of each pair file: regenerated data is refused, a copy or a touch (new times) is not."""
    import pyarrow.parquet as pq

    return [[str(f), f.stat().st_size, pq.read_metadata(f).num_rows] for f in files]


def check_out(out: Path, overwrite: bool) -> None:
    """Before anything loads: a table in `out` that no embedding run's parts/ is beside (parts/ deleted, or a
    training run's final/ holding its exported table) is replaced only with --overwrite; beside its parts/ the
    table is the one a rerun merges again, with the users it adds."""
    earlier = [p for p in (out / "user_table.safetensors", out / USERS_JSON) if p.exists()]
    if earlier and not overwrite and not (out / PARTS).is_dir():
        raise UserError(f"{earlier[0]} exists without the {out / PARTS} it would be merged from, and this run would "
                        "replace it: choose another --out, or pass --overwrite")


SHARD_WAIT = timedelta(hours=24)
"""How long processes that finished their users wait for the others (a resumed run's shards can be very uneven;
NCCL's default, 10 minutes, would abort it)."""


def run_embed(model: str, pairs: str, out: str, num_shots: int = 4, seed: int = 0, max_new_tokens: int = 1024,
              max_users: int = 0, dtype: str = "fp16") -> Optional[Dict[str, Any]]:
    """The command: shard users over accelerate's processes, embed, merge on the main process."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .llava import LlavaUserEncoder

    state = PartialState(timeout=SHARD_WAIT)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    dataset = _pair_data(pairs)
    _by_user(dataset)  # its ids checked before the model loads
    pairs_path = Path(pairs).resolve()
    settings = {"model": str(Path(model).resolve()), "pairs": str(pairs_path), "num_shots": num_shots, "seed": seed,
                "max_new_tokens": max_new_tokens, "dtype": dtype, "images": "one tile each",  # not so until 22
                "pairs_files": _pair_files(dataset.files)}  # data regenerated at the same path is other data
    check_parts_settings(Path(out), settings, record=False)  # before the 7B model loads on every process
    encoder = LlavaUserEncoder.from_pretrained(model, device=str(state.device), dtype=torch_dtype,
                                               max_new_tokens=max_new_tokens)
    # every process, once its model has loaded (a failed start records nothing) and before its first part: no part
    # is ever on disk without the settings beside it (atomic writes, one temporary file each)
    check_parts_settings(Path(out), settings)
    counts = embed_users(encoder, dataset, Path(out), num_shots, seed, state.process_index, state.num_processes,
                         max_users, progress=True)
    print(json.dumps({"process": state.process_index, **counts}))
    everyone = gather_object([counts])  # also waits for the slowest shard (up to SHARD_WAIT)
    state.destroy_process_group()  # the last collective: gloo left to Python's teardown can abort (train/train.py)
    if not state.is_main_process:
        return None
    summary = merge_parts(Path(out), handled=sum(c["embedded"] + c["already_done"] for c in everyone))
    summary["failed"] = sum(c["failed"] for c in everyone)
    print(json.dumps(summary))
    if summary["failed"]:
        print(f"note: {summary['failed']} user(s) failed (see the warnings above) and are not in the table (exit "
              "status 1); the same command again retries them with the same shots: a user that ran out of memory "
              "needs a lower --max-new-tokens or another --dtype", file=sys.stderr)
    return summary
