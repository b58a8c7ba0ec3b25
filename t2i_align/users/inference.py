"""Sampling for a user (PPD, Dang et al., CVPR 2025, arXiv 2501.06655): load a trained user branch, pick the user
tokens (a table id, an interpolation of two ids, or a toy user's shots) and hand them to `sampling.generate`.

A PPD run's `final/` holds user_branch.safetensors (IP-Adapter layout, Ye et al. 2023, arXiv 2308.06721), the
user table it trained with (user_table.safetensors) and, when LoRA trained too, pytorch_lora_weights.safetensors.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..errors import UserError
from .table import USER_TABLE_NAME, UserTable, interpolate_users, select_layers


class UserChoiceError(UserError, ValueError):
    """The user asked for cannot be sampled with this model; the message says what to pass."""


@dataclass
class UserChoice:
    """Who to sample for: `ids` (one, or two to interpolate α·B + (1−α)·A), or `shots` (a parquet of labelled
    pairs, embedded by the toy encoder); `table` overrides the table found next to the weights; `scale` the
    branch's user scale λ."""

    ids: List[str] = field(default_factory=list)
    alpha: Optional[float] = None
    table: Optional[str] = None
    shots: Optional[str] = None
    scale: Optional[float] = None

    @property
    def given(self) -> bool:
        return bool(self.ids or self.shots or self.table or self.alpha is not None or self.scale is not None)


def branch_file(folder) -> Optional[Path]:
    """folder/user_branch.safetensors if it exists (a file path is taken as the folder's)."""
    from ..conditioning.users import USER_WEIGHT_NAME

    if folder is None:
        return None
    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    path = folder / USER_WEIGHT_NAME
    return path if path.is_file() else None


def has_lora_file(folder: Path) -> bool:
    """Whether LoRA weights are there: a weights file itself, or a folder holding pytorch_lora_weights."""
    return folder.is_file() or (folder / "pytorch_lora_weights.safetensors").is_file()


def attach_user_branch(pipe, *folders) -> Optional[Path]:
    """Load the first user branch found in `folders` into pipe.unet; returns its file (None if none)."""
    from ..conditioning.users import load_user_branch

    for folder in folders:
        path = branch_file(folder)
        if path is not None:
            load_user_branch(pipe.unet, path.parent, path.name)
            return path
    return None


def _table(choice: UserChoice, folders: Sequence) -> UserTable:
    if choice.table:  # the file, or the folder holding it (a PPD run's final/, as --lora takes it)
        given = Path(choice.table)
        return UserTable.load(given / USER_TABLE_NAME if given.is_dir() else given, setting="--user-table")
    for folder in folders:
        if folder is not None:
            folder = Path(folder)
            path = (folder.parent if folder.is_file() else folder) / USER_TABLE_NAME
            if path.is_file():
                return UserTable.load(path, setting="--user-table")
    raise UserChoiceError(f"no {USER_TABLE_NAME} next to the weights; pass --user-table FILE")


def resolve_id(table: UserTable, given: str):
    """A command-line id (text) as the table spells it: "12" finds user 12 when the ids are ints."""
    if given in table:
        return given
    if re.fullmatch(r"-?\d+", given) and int(given) in table:  # "--1" is no number
        return int(given)
    table.embedding(given)  # raises UnknownUserError naming the table's ids
    return given


def user_embedding(choice: UserChoice, folders: Sequence) -> torch.Tensor:
    """One user's tokens [T, D] as `choice` says (see UserChoice)."""
    if choice.shots:
        if choice.ids:
            raise UserChoiceError("pass either --user or --user-shots, not both")
        if choice.alpha is not None or choice.table:  # they were ignored without a word
            raise UserChoiceError("--user-shots embeds the user from its pairs: --alpha and --user-table do not "
                                  "apply to it; drop them")
        from ..toy.ppd import embed_shots_file

        return embed_shots_file(choice.shots)
    if not choice.ids:
        raise UserChoiceError("this model has a user branch (PPD): pass --user ID (from the user table) or "
                              "--user-shots FILE")
    if len(choice.ids) > 2:
        raise UserChoiceError(f"--user given {len(choice.ids)} times; give one user, or two with --alpha")
    if (len(choice.ids) == 2) != (choice.alpha is not None):
        raise UserChoiceError("interpolation needs two --user ids and --alpha (0 = the first, 1 = the second)")
    if choice.alpha is not None and not math.isfinite(choice.alpha):
        raise UserChoiceError(f"--alpha {choice.alpha}: give a finite number (0 = the first user, 1 = the second)")
    if choice.alpha is not None and not 0 <= choice.alpha <= 1:
        warnings.warn(f"--alpha {choice.alpha} is outside [0, 1]: it extrapolates beyond the two users, which the "
                      "branch never saw", stacklevel=2)
    table = _table(choice, folders)
    ids = [resolve_id(table, u) for u in choice.ids]
    if len(ids) == 1:
        return table.embedding(ids[0])
    return interpolate_users(table.embedding(ids[0]), table.embedding(ids[1]), float(choice.alpha))


def user_tokens_for(pipe, choice: UserChoice, n: int, folders: Sequence) -> Optional[torch.Tensor]:
    """[n, T, D] tokens for every image when pipe.unet has a user branch (setting --user-scale on it); None when
    it has none (a user then is an error: the model was not trained for users)."""
    from ..conditioning.users import (UserBranchError, check_user_tokens, has_user_branch, set_user_scale,
                                      user_token_shape)

    if not has_user_branch(pipe.unet):
        if choice.given:
            raise UserChoiceError("--user / --user-shots / --user-table / --user-scale given, but the model has no "
                                  "user branch (no user_branch.safetensors next to --lora or in --model)")
        return None
    if choice.scale is not None:
        if not choice.scale >= 0 or not math.isfinite(choice.scale):  # nan passed `< 0`
            raise UserChoiceError(f"--user-scale {choice.scale}: must be a finite number >= 0")
        set_user_scale(pipe.unet, choice.scale)
    if choice.scale == 0 and not (choice.ids or choice.shots):  # the base model, as README and ppd.scale advise:
        return torch.zeros(1, *user_token_shape(pipe.unet)).expand(n, -1, -1)  # skipped at scale 0: no user needed
    embedding = user_embedding(choice, folders)
    taken = user_token_shape(pipe.unet)[0]
    if embedding.dim() == 2 and embedding.shape[0] > taken:  # a table of every VLM layer (a new user's, from
        warnings.warn(f"the user embedding has {embedding.shape[0]} rows and the branch takes {taken}: using the last "
                      f"{taken}, as ppd.layers keeps them (every choice is a suffix)", stacklevel=2)
        embedding = select_layers(embedding, taken)  # `users embed`): ppd.layers kept the last `taken`
    tokens = embedding[None].expand(n, -1, -1)  # a view: sampling slices one batch at a time (no n copies)
    try:
        check_user_tokens(pipe.unet, tokens)
    except ValueError as err:
        hint = " (--user-shots embeds with the toy world's encoder: toy models only)" if choice.shots else ""
        raise UserBranchError(f"{err}: the user embedding does not fit the trained branch (another encoder, "
                              f"layer selection or table?){hint}") from None
    return tokens
