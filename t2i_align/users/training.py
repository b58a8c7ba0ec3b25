"""PPD in the training loop: the user table, the user branch, user tokens for batches, and rows without a user.

PPD (Dang et al., CVPR 2025, arXiv 2501.06655) trains a user branch (IP-Adapter-style decoupled cross-attention,
Ye et al. 2023, arXiv 2308.06721; `t2i_align/conditioning/users.py`) with user-conditioned Diffusion-DPO: each
pair's `user_id` picks that user's embedding from the table, and the reference is the base model with every
adapter off. The loop calls `add_ppd_branch` once (after the attention backend is set, before accelerate wraps
the UNet), and its data source leaves out the rows of users missing from the table (`known_rows`); batches get
their tokens from `components.users`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from .table import UserTable, UserTableError, select_layers

logger = logging.getLogger(__name__)


class NoMatchingUsersError(UserError, ValueError):
    """No pair of the data set belongs to a user of the table."""


class ShotOverlapError(UserError, ValueError):
    """A pair that built a user's embedding is also one of that user's training pairs."""


def parse_layers(layers: Any):
    """ppd.layers ("all", "last" or a count as text) as `select_layers` takes it."""
    return layers if layers in ("all", "last") else int(layers)


def load_training_table(path: str, layers: Any = "all") -> UserTable:
    """The table at `path` with `layers` applied to every embedding (PPD's [L, D] VLM states -> [k, D] tokens)."""
    table = UserTable.load(path)
    layers = parse_layers(layers)
    if layers == "all":
        return table
    return UserTable(table.ids, torch.stack([select_layers(e, layers) for e in table.embeddings]))


def batch_user_ids(raw: Mapping[str, Any]) -> List[Any]:
    """The batch's user ids as a list (a data loader may have made a tensor of them)."""
    if "user_id" not in raw:
        raise UserError("ppd.enabled but the pairs have no user_id column: PPD needs each pair's user "
                        "(Pick-a-Pic's user_id); rebuild the data with one, or set ppd.enabled=false")
    ids = raw["user_id"]
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


TABLE_RECORD = "ppd_table.json"
"""In a checkpoint: the user table's path and sha256 as it trained."""


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class UserLookup:
    """Rows' user ids -> user tokens [B, T, D] from the table, with PPD's user-embedding dropout: each row's tokens
    are zeroed with probability `dropout` (drawn from torch's global generator, so a resumed run, whose RNG state
    accelerate restores, draws the same). Zeroed tokens are the learned "null user", not the base model: the
    projection's biases and LayerNorm still produce tokens (the base is scale 0, `user_branch_disabled`)."""

    def __init__(self, table: UserTable, dropout: float = 0.0, path: Optional[str] = None):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"user-embedding dropout {dropout} must be in [0, 1)")
        self.table, self.dropout, self.path = table, dropout, path

    def save(self, folder: Path) -> None:
        """Which table the checkpoint trained with: a resume compares (`load`)."""
        from ..files import write_json_atomic

        write_json_atomic(Path(folder) / TABLE_RECORD, {"table": self.path, "sha256": file_sha256(self.path)})

    def load(self, folder: Path) -> None:
        """A resume whose ppd.table file changed since the checkpoint (re-embedded, users added) goes on, told."""
        record = Path(folder) / TABLE_RECORD
        if self.path is None or not record.is_file():  # a checkpoint written before the record existed
            return
        if json.loads(record.read_text(encoding="utf-8")).get("sha256") != file_sha256(self.path):
            warnings.warn(f"ppd.table {self.path} is not the file the checkpoint {folder} trained with (its contents "
                          "changed since): the branch resumes on the new embeddings; if users were added or removed, "
                          "the pairs kept changed too, and this epoch's order with them (some of its pairs are seen "
                          "again, others skipped)", stacklevel=2)

    def batch_tokens(self, raw: Mapping[str, Any], device=None) -> torch.Tensor:
        tokens = self.table.tokens(batch_user_ids(raw), device=device, dtype=torch.float32)
        if self.dropout > 0:
            keep = (torch.rand(len(tokens)) >= self.dropout).to(tokens.device, tokens.dtype)
            tokens = tokens * keep[:, None, None]
        return tokens


def add_ppd_branch(components, ppd) -> List[torch.nn.Parameter]:
    """Load ppd.table, add a zero-initialised user branch of its width and token count to components.unet at
    ppd.scale, and set components.users. Returns the branch's trainable parameters (in ppd.blocks)."""
    from ..conditioning.users import add_user_branch, restrict_user_branch

    table = load_training_table(ppd.table, ppd.layers)
    add_user_branch(components.unet, table.dim, table.num_tokens, scale=ppd.scale)
    params = restrict_user_branch(components.unet, ppd.blocks)
    components.users = UserLookup(table, ppd.dropout, ppd.table)
    logger.info("PPD user branch: %d users, %d tokens of width %d, %d parameters", len(table), table.num_tokens,
                table.dim, sum(p.numel() for p in params))
    return params


def count_known(user_ids: Optional[Sequence[Any]], table: UserTable, what: str) -> Tuple[int, int]:
    """(pairs whose user is in the table, pairs whose user is not); a clear error if none is or ids are absent."""
    if user_ids is None:
        raise UserError(f"ppd.enabled but {what} has no user ids (no user_id column, or a cache built before user "
                        "ids were cached: delete that cache folder to rebuild it)")
    known = sum(u in table for u in user_ids)
    if known == 0:
        pairs_types, table_types = "/".join(id_types(user_ids)), "/".join(id_types(table.ids))
        if pairs_types != table_types:  # 1000 vs "1000": print alike, never equal
            raise NoMatchingUsersError(
                f"the pairs' user ids in {what} are {pairs_types} but the user table's are {table_types} (e.g. "
                f"{_some(user_ids)} vs {_some(table.ids)}), so no pair matches a user: rebuild the table "
                "(ppd.table) or the pairs' user_id column with the other's id type")
        raise NoMatchingUsersError(f"none of the {len(user_ids)} pairs of {what} belongs to a user of the user "
                                   f"table ({len(table)} users, e.g. {_some(table.ids)}); the pairs' users are "
                                   f"e.g. {_some(user_ids)}. Use the table built for this data (ppd.table)")
    return known, len(user_ids) - known


def id_types(ids: Iterable[Any]) -> List[str]:
    """The ids' type names, a whole float counted as the int `embed` writes it as (pandas writes 7.0 beside a NaN);
    missing ids (None, NaN) left out."""
    whole = (lambda u: int if isinstance(u, float) and u.is_integer() else type(u))  # noqa: E731
    return sorted({whole(u).__name__ for u in ids if u is not None and not (isinstance(u, float) and u != u)})


def _some(ids: Iterable[Any]) -> str:
    """Up to 5 distinct ids as their reprs, so 7 and '7' read differently."""
    return ", ".join(sorted({repr(u) for u in ids})[:5])


def known_rows(user_ids: Optional[Sequence[Any]], table: UserTable, what: str, tell=logger.warning) -> List[int]:
    """The rows whose user is in the table, the others counted in a warning (`tell`: the run's main-process one).
    The data source drops them before sharding, so every batch holds `train.batch_size` pairs of known users:
    dropped batch by batch, a batch of 4 with 2 unknown users would train on 2 pairs, each weighing double."""
    known, unknown = count_known(user_ids, table, what)
    if unknown:
        tell(f"PPD: {unknown} of {known + unknown} pairs of {what} belong to users missing from the user table; "
             "they are left out")
    return [i for i, user in enumerate(user_ids) if user in table]


def pair_fingerprint(caption: str, image_a: Any, image_b: Any) -> str:
    """One pair's identity, whichever image is listed first: the caption and the two images' bytes (an HF `Image`
    dict's bytes; a missing image as no bytes: training skips such a row, and no shot has one)."""
    a, b = sorted(hashlib.sha1(_image_bytes(x)).hexdigest() for x in (image_a, image_b))
    return hashlib.sha1(f"{caption}\0{a}\0{b}".encode()).hexdigest()


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # HF `Image` feature layout: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def check_shots_disjoint(shots: Mapping[Hashable, Iterable[str]], pairs: Iterable[Tuple[Hashable, str]]) -> int:
    """Raise ShotOverlapError if a pair that built a user's embedding (`shots`: user -> pair fingerprints) is
    also a training pair of that user (`pairs`: (user, fingerprint) per row); returns the rows checked.

    A shot trained on would let the model learn the pair back from its own embedding: the "new user from 4
    shots" evaluation would then measure memory, not generalisation (PPD keeps support and query pairs apart)."""
    used = {user: set(prints) for user, prints in shots.items()}
    overlaps, rows = [], 0
    for user, fingerprint in pairs:
        rows += 1
        if fingerprint in used.get(user, ()):
            overlaps.append((user, fingerprint[:12]))
    if overlaps:
        raise ShotOverlapError(f"{len(overlaps)} training pair(s) were also shots of the same user's embedding "
                               f"(e.g. user {overlaps[0][0]!r}, pair {overlaps[0][1]}); take the shots from pairs "
                               "that are not trained on")
    return rows


__all__ = ["NoMatchingUsersError", "ShotOverlapError", "UserLookup", "UserTableError", "add_ppd_branch",
           "batch_user_ids", "check_shots_disjoint", "count_known", "id_types", "known_rows", "load_training_table",
           "pair_fingerprint", "parse_layers"]
