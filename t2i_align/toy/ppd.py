"""Toy PPD data: base samples labelled by many toy users, user embeddings from disjoint shots, and judging per user.

PPD (Dang et al., CVPR 2025, arXiv 2501.06655) trains one model for many users: each pair carries its rater, and
the rater's embedding (a VLM reading 4 of their labelled pairs) conditions the denoiser. The toy version:

- a *pool* of base-model samples: k images per user caption (the caption names colour, shape, size and position
  but not the background, so the images' backgrounds vary; or, with the colour as the free attribute, names the
  background but not the colour);
- *pairs*: each caption's k images cut into k/2 fixed pairs; every training user labels the SAME pairs by their
  hidden taste (t2i_align/toy/users.py), so users disagree on identical pairs; ties are not written;
- *shots*: 4 labelled pairs per embedding, from captions never used for training pairs, so no user's shots are
  among their training pairs (checked: `check_shots_disjoint`); training users get several embeddings (PPD: up
  to 20 per user, each from 4 other pairs) and each of their pairs is tagged with one of them;
- *held-out users* get one embedding from 4 shots and no pairs at all.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..users.table import UserTable
from ..users.training import check_shots_disjoint, pair_fingerprint
from .users import FREE_ATTRIBUTE, NUM_SHOTS, TOKEN_SCALE, Shot, ToyUser, ToyUserEncoder, named_attributes


class NotEnoughShotsError(UserError, ValueError):
    """A user has fewer labelled pairs than an embedding needs."""


class UserIdClash(UserError, ValueError):
    """Toy users whose table ids would overwrite each other (a flag's value: one `error:` line)."""


@dataclass
class Pool:
    """k base samples per caption: images [P, k, H, W, 3] uint8 and the judge's readout of each."""

    captions: List[str]
    images: np.ndarray
    free: List[List[Optional[str]]]
    """[P][k] the judge's readout of the attribute the captions leave free (`attribute`)."""
    named_score: np.ndarray
    """[P, k] fraction of the caption's four named attributes the judge reads right."""
    attribute: str = FREE_ATTRIBUTE

    def save(self, folder: Path) -> None:
        from ..files import save_safetensors_atomic, write_text_atomic

        # Contiguous copies: safetensors.numpy wrote a strided array's raw buffer, so pools stacked from
        # to_uint8's transposed views were stored scrambled (channel-major bytes read back as pixels).
        arrays = {"images": self.images, "named_score": self.named_score}
        save_safetensors_atomic(folder / "pool.safetensors",
                                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, {})
        write_text_atomic(folder / "pool.json", json.dumps({"captions": self.captions, "free": self.free,
                                                           "attribute": self.attribute}))

    @classmethod
    def load(cls, folder: Path) -> "Pool":
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / "pool.safetensors"))
        meta = json.loads((folder / "pool.json").read_text())
        free = meta["free"] if "free" in meta else meta["backgrounds"]  # pools written before the colour option
        return cls(meta["captions"], arrays["images"], free, arrays["named_score"],
                   meta.get("attribute", FREE_ATTRIBUTE))


def judge_user_images(images: Sequence[np.ndarray], captions: Sequence[str], free: str = FREE_ATTRIBUTE
                      ) -> Tuple[List[Optional[str]], List[float]]:
    """(readout of the free attribute, fraction of the named attributes right) per image."""
    from .judge import read_attributes

    values, named = [], []
    for image, caption in zip(images, captions):
        read, want = read_attributes(image), named_attributes(caption, free)
        values.append(read[free])
        named.append(sum(read[a] == v for a, v in want.items()) / len(want))
    return values, named


def sample_pool(pipe, captions: Sequence[str], k: int, base_seed: int, batch_size: int = 128,
                free: str = FREE_ATTRIBUTE) -> Pool:
    """k samples per caption at the toy evaluation settings and fixed seeds, judged."""
    from ..gallery import to_uint8
    from ..sampling import generate, prompt_major
    from .evaluate import TOY_GUIDANCE, TOY_STEPS

    flat, seeds = prompt_major(list(captions), k, base_seed)
    samples = generate(pipe, flat, seeds, num_inference_steps=TOY_STEPS, guidance_scale=TOY_GUIDANCE,
                       batch_size=batch_size)
    images = to_uint8(samples.images)
    values, named = judge_user_images(images, flat, free)
    p = len(captions)
    return Pool(list(captions), np.stack(images).reshape(p, k, *images[0].shape),
                [values[i * k:(i + 1) * k] for i in range(p)], np.array(named, np.float32).reshape(p, k), free)


def fixed_pairs(pool: Pool, seed: int) -> List[Tuple[int, int, int]]:
    """(caption index, image a, image b): each caption's k images shuffled into k // 2 disjoint pairs."""
    rng = random.Random(seed)
    pairs = []
    for p in range(len(pool.captions)):
        order = list(range(pool.images.shape[1]))
        rng.shuffle(order)
        pairs += [(p, a, b) for a, b in zip(order[0::2], order[1::2])]
    return pairs


def _fingerprint(pool: Pool, p: int, a: int, b: int) -> str:
    return pair_fingerprint(pool.captions[p], pool.images[p, a].tobytes(), pool.images[p, b].tobytes())


def user_shots(user: ToyUser, pool: Pool, count: int, rng: random.Random) -> Tuple[List[Shot], List[str]]:
    """`count` non-tied labelled pairs of `user` from `pool`, no pair twice; (shots, their fingerprints)."""
    candidates = [(p, a, b) for p in range(len(pool.captions)) for a in range(pool.images.shape[1])
                  for b in range(a + 1, pool.images.shape[1])
                  if user.label(pool.free[p][a], pool.free[p][b]) != 0.5]
    if len(candidates) < count:
        raise NotEnoughShotsError(f"user {user.user_id} has {len(candidates)} usable (non-tied) pairs in the shot "
                                  f"pool but {count} are needed ({NUM_SHOTS} per embedding)")
    shots, prints = [], []
    for p, a, b in rng.sample(candidates, count):
        first = a if user.label(pool.free[p][a], pool.free[p][b]) == 1.0 else b
        shots.append(Shot(pool.captions[p], pool.images[p, first], pool.images[p, a + b - first]))
        prints.append(_fingerprint(pool, p, a, b))
    return shots, prints


def embed_users(encoder: ToyUserEncoder, shot_sets: Dict[int, Sequence[Shot]],
                num_shots: int = NUM_SHOTS) -> Dict[int, torch.Tensor]:
    """Embedding id -> [num_shots, D]; a set with fewer shots fails naming the id (more: the first num_shots)."""
    short = {i: len(s) for i, s in shot_sets.items() if len(s) < num_shots}
    if short:
        raise NotEnoughShotsError(f"user embedding(s) {sorted(short)[:5]} have {sorted(set(short.values()))} shots; "
                                  f"each needs {num_shots} labelled pairs (PPD's 4 shots)")
    ids = list(shot_sets)
    stacked = encoder.encode_many([list(shot_sets[i])[:num_shots] for i in ids])
    return dict(zip(ids, stacked))


def pair_label(user: ToyUser, pool: Pool, p: int, a: int, b: int, prompt_weight: float = 0.0) -> float:
    """label_0 of pool pair (p, a, b) by a training user whose utility is taste + prompt_weight · named score
    (the judge's fraction of the caption's named attributes). 0 (default): taste alone. Below 0.5 (a step of a
    three-value taste is 0.5) taste still decides every pair it can and prompt-following breaks its ties, so all
    users agree on those pairs: users who, like Pick-a-Pic's raters, also want the prompt followed."""
    u = [user.utility(pool.free[p][i]) + prompt_weight * float(pool.named_score[p, i]) for i in (a, b)]
    return 1.0 if u[0] > u[1] else 0.0 if u[0] < u[1] else 0.5


def embedding_id(user_id: int, j: int) -> int:
    """The table id of training user `user_id`'s j-th embedding (pairs carry it as their user_id)."""
    return user_id * 100 + j


def write_ppd_data(out: Path, pairs_pool: Pool, shot_pool: Pool, train_users: Sequence[ToyUser],
                   heldout_users: Sequence[ToyUser], encoder: ToyUserEncoder, embeddings_per_user: int = 4,
                   seed: int = 0, prompt_weight: float = 0.0) -> Dict:
    """pairs.parquet (every training user labels the same fixed pairs, by `pair_label` with `prompt_weight`),
    user_table.safetensors (training users' embeddings and the held-out users'), users.json (tastes, ids, shot
    fingerprints). Returns counts. Shots are always pairs the user's taste decides: the embedding is what a user
    shows of their taste, whatever else they reward."""
    from ..files import write_text_atomic
    from .pairs import jpeg_bytes, write_parquet

    if any(u.attribute != pairs_pool.attribute for u in [*train_users, *heldout_users]):
        raise ValueError(f"the pools leave {pairs_pool.attribute!r} free but some users' tastes are about another "
                         "attribute; make the users with make_toy_users(..., attribute=pool.attribute)")
    if not 1 <= embeddings_per_user <= 100:  # user·100 + j would reach the next user's ids
        raise UserIdClash(f"embeddings_per_user {embeddings_per_user}: give 1 to 100 (table ids are user·100 + j)")
    clash = {u.user_id for u in heldout_users} & {u.user_id for u in train_users}
    if clash:  # its shot fingerprints would replace the training user's before the overlap check
        raise UserIdClash(f"held-out users {sorted(clash)} have training users' ids: give them ids of their own")
    rng = random.Random(seed)
    shot_sets, prints, owner = {}, {}, {}
    for user in train_users:
        shots, fps = user_shots(user, shot_pool, NUM_SHOTS * embeddings_per_user, rng)
        for j in range(embeddings_per_user):  # non-overlapping chunks of 4, as PPD's stage 1
            shot_sets[embedding_id(user.user_id, j)] = shots[j * NUM_SHOTS:(j + 1) * NUM_SHOTS]
            owner[embedding_id(user.user_id, j)] = user.user_id
        prints[user.user_id] = fps
    _heldout_shots(heldout_users, shot_pool, rng, shot_sets, prints, owner)
    rows, trained = [], []
    for p, a, b in fixed_pairs(pairs_pool, seed):
        jpg = (jpeg_bytes(pairs_pool.images[p, a]), jpeg_bytes(pairs_pool.images[p, b]))
        for user in train_users:
            label = pair_label(user, pairs_pool, p, a, b, prompt_weight)
            if label == 0.5:
                continue
            emb = embedding_id(user.user_id, rng.randrange(embeddings_per_user))
            rows.append({"caption": pairs_pool.captions[p], "jpg_0": jpg[0], "jpg_1": jpg[1], "label_0": label,
                         "label_1": 1.0 - label, "user_id": emb, "are_different": True, "has_label": True,
                         "model_0": "toy-base", "model_1": "toy-base", "ranking_id": len(rows)})
            trained.append((user.user_id, _fingerprint(pairs_pool, p, a, b)))
    check_shots_disjoint(prints, trained)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(rows, out / "pairs.parquet")
    table = UserTable.from_dict(embed_users(encoder, shot_sets))
    table.save(out / "user_table.safetensors")
    meta = {"attribute": pairs_pool.attribute, "train_users": {u.user_id: list(u.ranking) for u in train_users},
            "heldout_users": {u.user_id: list(u.ranking) for u in heldout_users},
            "embedding_owner": owner, "shot_fingerprints": prints, "pairs": len(rows),
            "pairs_per_user": len(rows) / max(1, len(train_users)), "embeddings_per_user": embeddings_per_user,
            "prompt_weight": prompt_weight}
    write_text_atomic(out / "users.json", json.dumps(meta, indent=1))
    return {k: v for k, v in meta.items() if k in ("pairs", "pairs_per_user", "embeddings_per_user",
                                                    "prompt_weight")}


def _heldout_shots(users: Sequence[ToyUser], shot_pool: Pool, rng: random.Random, shot_sets: Dict, prints: Dict,
                   owner: Dict) -> None:
    """One embedding of 4 shots per held-out user (no pairs), added to `shot_sets`, `prints` and `owner`."""
    for user in users:
        if user.user_id in shot_sets:  # a training user's embedding id (user·100 + j): it would be replaced
            raise ValueError(f"held-out user {user.user_id} has the table id of training user "
                             f"{owner[user.user_id]}'s embedding {user.user_id % 100}: give held-out users ids that "
                             "are no training user's id·100 + j (e.g. above every training id·100 + 99)")
        shot_sets[user.user_id], prints[user.user_id] = user_shots(user, shot_pool, NUM_SHOTS, rng)
        owner[user.user_id] = user.user_id


def write_heldout_users(out: Path, shot_pool: Pool, users: Sequence[ToyUser], encoder: ToyUserEncoder,
                        seed: int) -> Dict:
    """A further set of held-out users beside an existing PPD data folder, leaving its training data untouched:
    users.json (tastes, shot fingerprints; no training users) and user_table.safetensors (their embeddings),
    each from 4 shots of `shot_pool` drawn with `seed`. For evaluating more held-out users than `write_ppd_data`
    made without re-drawing its pairs."""
    if any(u.attribute != shot_pool.attribute for u in users):
        raise ValueError(f"the shot pool leaves {shot_pool.attribute!r} free but some users' tastes are about "
                         "another attribute")
    shot_sets, prints, owner = {}, {}, {}
    _heldout_shots(users, shot_pool, random.Random(seed), shot_sets, prints, owner)
    out.mkdir(parents=True, exist_ok=True)
    UserTable.from_dict(embed_users(encoder, shot_sets)).save(out / "user_table.safetensors")
    meta = {"attribute": shot_pool.attribute, "train_users": {},
            "heldout_users": {u.user_id: list(u.ranking) for u in users}, "embedding_owner": owner,
            "shot_fingerprints": prints, "shots_seed": seed}
    from ..files import write_text_atomic

    write_text_atomic(out / "users.json", json.dumps(meta, indent=1))
    return {"heldout_users": len(users), "rankings": dict(Counter(" > ".join(u.ranking) for u in users))}


def embed_shots_file(path, encoder: Optional[ToyUserEncoder] = None, num_shots: int = NUM_SHOTS) -> torch.Tensor:
    """A toy user's embedding [num_shots, 64] from a Pick-a-Pic-format parquet of their labelled pairs (ties and
    unreadable rows skipped; the first `num_shots` usable rows are used), by default with the toy CLIP encoder at
    TOKEN_SCALE, as `benchmarks/toy_ppd.py` builds its tables. For `sample/generate.py --user-shots`."""
    from ..data.pairs import PairDataset

    try:
        data = PairDataset(path, resolution=32)
    except ValueError as err:  # no usable rows, missing columns
        raise NotEnoughShotsError(f"user shots {path}: {err}") from None
    shots = []
    for i in range(len(data)):
        images = data.decode(i)
        if images is not None:
            shots.append(Shot(data.caption(i), *(np.asarray(im) for im in images)))
        if len(shots) == num_shots:
            break
    encoder = encoder or ToyUserEncoder.from_toy_clip(scale=TOKEN_SCALE)
    return embed_users(encoder, {0: shots}, num_shots)[0]
