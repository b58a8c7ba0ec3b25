"""The user table: user id -> user embedding [T, D], saved as one safetensors file.

PPD (Dang et al., CVPR 2025, arXiv 2501.06655) embeds each user once, offline, with a VLM that has seen four of
their preferred / dispreferred pairs: the last generated token's hidden state from every layer, [29, 3584] for
LLaVA-OneVision Qwen2-7B. Training then looks the embedding up by the pair's `user_id`, so the table is all the
loop needs; how the embeddings were made (VLM or the toy encoder) does not matter here.

File layout: one stacked tensor "embeddings" [N, T, D] (any float dtype; PPD's are worth keeping in fp16) and
the ids, in row order, as JSON in the metadata ("t2i_align.user_ids"): ints stay ints (Pick-a-Pic's user_id),
strings stay strings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import UserError

UserId = Union[int, str]
USER_TABLE_NAME = "user_table.safetensors"
"""The table's file name next to exported weights (final/): sample/generate.py --user finds it there."""
_FORMAT = "t2i-align-user-table"
_IDS_KEY = "t2i_align.user_ids"
_TENSOR = "embeddings"


class UserTableError(UserError, ValueError):
    """A user table is malformed, or does not fit what it is used with."""


class UnknownUserError(UserError, KeyError):
    """A user id that is not in the table."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def interpolate_users(e_a: torch.Tensor, e_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·e_B + (1−α)·e_A: user A at α = 0, user B at α = 1 (PPD's interpolation between users at inference).

    Computed in float32 and returned in e_a's dtype, so fp16 tables do not lose the small steps of a sweep.
    """
    if e_a.shape != e_b.shape:
        raise UserTableError(f"cannot interpolate embeddings of shapes {tuple(e_a.shape)} and {tuple(e_b.shape)}")
    mixed = float(alpha) * e_b.float() + (1.0 - float(alpha)) * e_a.float()
    return mixed.to(e_a.dtype)


def select_layers(embedding: torch.Tensor, layers: Union[str, int] = "all") -> torch.Tensor:
    """Which rows of a PPD embedding [L, D] (one row per VLM layer) become user tokens.

    "all": every layer (the unofficial PPD stage 2 feeds all 29); "last": the final layer only (what PPD's user
    classifier uses); an int k: the last k layers. The paper's own choice could not be confirmed.
    """
    if embedding.dim() != 2:
        raise UserTableError(f"expected one embedding [layers, width]; got shape {tuple(embedding.shape)}")
    if layers == "all":
        return embedding
    if layers == "last":
        return embedding[-1:]
    if isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= embedding.shape[0]:
        return embedding[-layers:]
    raise UserTableError(f"layers={layers!r}: use 'all', 'last' or a count in 1..{embedding.shape[0]}")


def _check_ids(ids: Sequence[UserId]) -> Tuple[UserId, ...]:
    for user_id in ids:
        if isinstance(user_id, bool) or not isinstance(user_id, (int, str)):
            raise UserTableError(f"user ids must be ints or strings; got {user_id!r} ({type(user_id).__name__})")
    seen: Dict[UserId, int] = {}
    for i, user_id in enumerate(ids):
        if user_id in seen:
            raise UserTableError(f"user id {user_id!r} appears twice (rows {seen[user_id]} and {i})")
        seen[user_id] = i
    return tuple(ids)


class UserTable:
    """Ids -> embeddings [num_tokens, dim], all of one shape. Immutable: build a new table to change it."""

    def __init__(self, ids: Sequence[UserId], embeddings: torch.Tensor):
        self.ids = _check_ids(list(ids))
        if embeddings.dim() != 3:
            raise UserTableError(f"embeddings must be [users, tokens, width]; got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] != len(self.ids):
            raise UserTableError(f"{len(self.ids)} ids but {embeddings.shape[0]} embeddings")
        if not embeddings.is_floating_point() or not bool(torch.isfinite(embeddings).all()):
            raise UserTableError("embeddings must be finite floating-point numbers")
        self.embeddings = embeddings.detach().cpu().contiguous()
        self._row = {user_id: i for i, user_id in enumerate(self.ids)}

    @classmethod
    def from_dict(cls, embeddings: Mapping[UserId, torch.Tensor]) -> "UserTable":
        """From {id: [T, D]}; every embedding must have the first one's shape."""
        if not embeddings:
            raise UserTableError("a user table needs at least one user")
        items = list(embeddings.items())
        first_id, first = items[0]
        for user_id, emb in items:
            if emb.shape != first.shape:
                raise UserTableError(f"user {user_id!r} has an embedding of shape {tuple(emb.shape)}, but user "
                                     f"{first_id!r} has {tuple(first.shape)}; all users need one shape [tokens, width]")
        return cls([k for k, _ in items], torch.stack([v for _, v in items]))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._row

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]

    def _index(self, user_id: UserId) -> int:
        if user_id not in self._row:
            near = ", ".join(repr(i) for i in self.ids[:5]) + (", ..." if len(self.ids) > 5 else "")
            raise UnknownUserError(f"user {user_id!r} is not in the user table ({len(self.ids)} users: {near}); "
                                   "embed the user first (PPD needs 4 labelled pairs per user)")
        return self._row[user_id]

    def embedding(self, user_id: UserId) -> torch.Tensor:
        """One user's [T, D]."""
        return self.embeddings[self._index(user_id)]

    def tokens(self, user_ids: Sequence[UserId], device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The batch's user tokens [B, T, D], one row per id (ids may repeat), for `user_added_cond`."""
        rows = torch.tensor([self._index(u) for u in user_ids], dtype=torch.long)
        return self.embeddings.index_select(0, rows).to(device=device, dtype=dtype or self.embeddings.dtype)

    def interpolate(self, id_a: UserId, id_b: UserId, alpha: float) -> torch.Tensor:
        """α·e_B + (1−α)·e_A as [T, D]."""
        return interpolate_users(self.embedding(id_a), self.embedding(id_b), alpha)

    def check_dim(self, dim: int, what: str = "the user branch") -> None:
        if self.dim != dim:
            raise UserTableError(f"the user table's embeddings are {self.dim} wide but {what} expects {dim}; "
                                 "rebuild the branch with user_dim matching the table, or use the table it was "
                                 "trained with")

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write safetensors via a temporary file and a rename; returns the path."""
        from ..files import save_safetensors_atomic

        return save_safetensors_atomic(Path(path), {_TENSOR: self.embeddings},
                                       {"format": "pt", "t2i_align.format": _FORMAT,
                                        _IDS_KEY: json.dumps(list(self.ids))})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], dim: Optional[int] = None, setting: str = "ppd.table") -> "UserTable":
        """Read a table written by `save`; with `dim`, also check the embedding width. `setting`: what set the path
        (training's ppd.table, the sample scripts' --user-table), for the error."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no user table at {path}: set {setting} to the "
                                    "user_table.safetensors that `python -m t2i_align.users embed` writes")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta, names = f.metadata() or {}, set(f.keys())
                embeddings = f.get_tensor(_TENSOR) if _TENSOR in names else None
        except (SafetensorError, OSError, ValueError) as err:
            raise UserTableError(f"{path} is not a readable safetensors file ({err}); rebuild the user table") from err
        if meta.get("t2i_align.format") != _FORMAT or embeddings is None or _IDS_KEY not in meta:
            raise UserTableError(f"{path} is a safetensors file but not a user table (expected a {_TENSOR!r} tensor "
                                 f"and {_IDS_KEY!r} metadata, as UserTable.save writes)")
        try:
            ids = json.loads(meta[_IDS_KEY])
        except json.JSONDecodeError as err:
            raise UserTableError(f"{path}: the user-id list in the metadata is damaged ({err})") from err
        if not isinstance(ids, list):
            raise UserTableError(f"{path}: the user ids in the metadata are not a list")
        table = cls(ids, embeddings)
        if dim is not None:
            table.check_dim(dim)
        return table
