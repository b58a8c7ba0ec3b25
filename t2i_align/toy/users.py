"""Toy users for PPD: hidden tastes over the one attribute their prompts leave free.

PPD (Dang et al., CVPR 2025, arXiv 2501.06655) personalises a diffusion model to users whose preferences differ
where the prompt does not decide. The toy short caption names all five scene attributes, so toy users write
*user captions* that omit the background ("a large red circle at the top left"): the background is then free, and
each user has a hidden ranking of the three backgrounds. A user prefers the image whose background (as the
judge reads it off the pixels) ranks higher; the same background is a tie (0.5, dropped like Pick-a-Pic ties).
The free attribute can be the object's colour instead (`attribute="color"`: captions name size, shape, position
and background, users rank the five colours).

The user encoder needs no VLM: a shot is (preferred image, dispreferred image) of one prompt, and its token is
toy-CLIP(preferred) − toy-CLIP(dispreferred) (L2-normalised image features): what the user moved towards. A user
embedding is one token per shot, [num_shots, 64], 4 shots as in PPD. The user branch attends over the tokens
without positions, so shot order does not matter.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .judge import read_attributes
from .scenes import ATTRIBUTES, VALUES, Scene, noisy_scene, partial_caption, render

FREE_ATTRIBUTES = ("background", "color")
"""What a toy user's taste can be about: an attribute their captions leave free. The background (the default; the
toy base follows it poorly: black is hard for it to draw) or the object's colour (what it follows best)."""
FREE_ATTRIBUTE = "background"
NAMED_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a != FREE_ATTRIBUTE)
"""What a user caption names by default: colour, shape, size and position."""
NUM_SHOTS = 4
"""Preference pairs per user embedding, as PPD's stage 1 (4 shots)."""
TOKEN_SCALE = 10.0
"""What toy PPD multiplies the encoder's tokens by (t2i_align/toy/ppd.py; see ToyUserEncoder)."""


def named_for(free: str) -> Tuple[str, ...]:
    """The four attributes a user caption names when `free` is left to the user's taste."""
    if free not in FREE_ATTRIBUTES:
        raise ValueError(f"free attribute {free!r}: use one of {FREE_ATTRIBUTES}")
    return tuple(a for a in ATTRIBUTES if a != free)


def user_caption(scene: Scene, free: str = FREE_ATTRIBUTE) -> str:
    """The scene's caption without attribute `free`, e.g. "a large red circle at the top left" (no background)."""
    return partial_caption(scene, named_for(free))


def _one_of(attr: str) -> str:
    return "(?P<%s>%s)" % (attr, "|".join(re.escape(v) for v in VALUES[attr]))


_USER_CAPTION = re.compile(rf"a (?:{_one_of('size')} )?(?:{_one_of('color')} )?(?:{_one_of('shape')}|shape)"
                           rf"(?: at the {_one_of('position')})?(?: on a {_one_of('background')} background)?")


def named_attributes(caption: str, free: str = FREE_ATTRIBUTE) -> Dict[str, str]:
    """Invert `user_caption`: the four attributes it names (to judge prompt-following without the free one)."""
    match = _USER_CAPTION.fullmatch(caption.strip())
    named = {k: v for k, v in match.groupdict().items() if v is not None} if match else {}
    if set(named) != set(named_for(free)):
        raise ValueError(f"not a toy user caption naming {named_for(free)}: {caption!r}")
    return named


@dataclass(frozen=True)
class ToyUser:
    """A user whose taste is a ranking of the free attribute's values (the backgrounds), most liked first."""

    user_id: int
    ranking: Tuple[str, ...]
    attribute: str = FREE_ATTRIBUTE
    """What the taste is about (one of FREE_ATTRIBUTES)."""

    def __post_init__(self):
        named_for(self.attribute)  # a known free attribute
        if sorted(self.ranking) != sorted(VALUES[self.attribute]):
            raise ValueError(f"ranking {self.ranking} must order every {self.attribute} "
                             f"{tuple(VALUES[self.attribute])} once")

    @property
    def favourite(self) -> str:
        return self.ranking[0]

    def utility(self, value: Optional[str]) -> float:
        """1 for the favourite, 0 for the least liked, evenly between; an unreadable value (None) -1."""
        if value is None:
            return -1.0
        return 1.0 - self.ranking.index(value) / (len(self.ranking) - 1)

    def label(self, value_0: Optional[str], value_1: Optional[str]) -> float:
        """Pick-a-Pic's label_0: 1.0 if image 0 is preferred, 0.0 if image 1, 0.5 for a tie."""
        u0, u1 = self.utility(value_0), self.utility(value_1)
        return 1.0 if u0 > u1 else 0.0 if u0 < u1 else 0.5

    def label_images(self, image_0: np.ndarray, image_1: np.ndarray) -> float:
        """`label` on the judge's readout (of the free attribute) of two uint8 [H, W, 3] images of one prompt."""
        return self.label(read_attributes(image_0)[self.attribute], read_attributes(image_1)[self.attribute])


def make_toy_users(num_users: int = 6, seed: int = 0, attribute: str = FREE_ATTRIBUTE) -> List[ToyUser]:
    """`num_users` users with ids 0..n-1. Every ranking of the attribute's values (6 for the background, 120 for
    the colour) is shuffled with `seed` and dealt in turn, so the first users all differ and, once the rankings run
    out, later ones repeat a taste (real users share tastes too)."""
    if num_users < 1:
        raise ValueError(f"num_users={num_users} must be at least 1")
    rankings = list(itertools.permutations(VALUES[attribute]))
    random.Random(seed).shuffle(rankings)
    return [ToyUser(i, tuple(rankings[i % len(rankings)]), attribute) for i in range(num_users)]


def favourite_read_right(user: ToyUser, shown: Sequence[Tuple[str, str]]) -> float:
    """The chance that a perfect reader of `shown` ("preferred", "dispreferred") pairs names `user`'s favourite:
    it takes the favourite held by most rankings consistent with every pair (a uniform prior over rankings), ties
    split evenly. The ceiling of any user encoder that sees only these shots."""
    consistent = [r for r in itertools.permutations(user.ranking) if all(r.index(a) < r.index(b) for a, b in shown)]
    votes: Dict[str, int] = {}
    for r in consistent:
        votes[r[0]] = votes.get(r[0], 0) + 1
    top = [v for v, c in votes.items() if c == max(votes.values())]
    return float(user.favourite in top) / len(top)


@dataclass(frozen=True)
class Shot:
    """One labelled pair of a user: the caption and the preferred and dispreferred images (uint8 HWC)."""

    caption: str
    preferred: np.ndarray
    dispreferred: np.ndarray


def rendered_shots(user: ToyUser, scenes: Sequence[Scene], num_shots: int, rng: random.Random,
                   noise: float = 0.3) -> List[Shot]:
    """Shots from rendered ground truth instead of model samples (fast, for tests and sanity checks).

    Each shot takes a random scene; its two images are renderings of that scene with each named attribute but
    colour changed with probability `noise` and the background drawn uniformly (the caption leaves it free), as
    a base model's samples vary. Pairs the user ties on are redrawn, as PPD drops ties.
    """
    shots = []
    while len(shots) < num_shots:
        scene = scenes[rng.randrange(len(scenes))]
        images, values = [], []
        for _ in range(2):
            varied = noisy_scene(scene, rng, noise).as_dict()
            varied[user.attribute] = rng.choice(VALUES[user.attribute])
            images.append(render(Scene(**varied), rng))
            values.append(varied[user.attribute])
        label = user.label(*values)
        if label == 0.5:
            continue
        first = 0 if label == 1.0 else 1
        shots.append(Shot(user_caption(scene, user.attribute), images[first], images[1 - first]))
    return shots


class ToyUserEncoder:
    """Shots -> user tokens [num_shots, D]: image features of each preferred minus dispreferred image."""

    def __init__(self, image_features: Callable[[List[np.ndarray]], torch.Tensor], scale: float = 1.0):
        """`scale` multiplies every token: toy-CLIP differences have components of ~0.1, far smaller than a VLM's
        hidden states, and `TOKEN_SCALE` brings them to O(1) for the user branch's projection."""
        self.scale = float(scale)
        self.image_features = image_features

    @classmethod
    def from_toy_clip(cls, device=None, scale: float = 1.0) -> "ToyUserEncoder":
        """With the shipped toy CLIP's L2-normalised image features (D = 64), on CPU unless `device`."""
        from reward_models.clip import ToyClip

        return cls(ToyClip(device=device or "cpu").encoder.encode_images, scale=scale)

    def encode(self, shots: Sequence[Shot]) -> torch.Tensor:
        """One user's embedding [len(shots), D] (float32, CPU)."""
        return self.encode_many([shots])[0]

    def encode_many(self, shot_sets: Sequence[Sequence[Shot]]) -> torch.Tensor:
        """Several embeddings [N, T, D] in one pass of the image encoder; every set needs the same T."""
        counts = {len(s) for s in shot_sets}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"every shot set needs the same, non-zero number of shots; got sizes {sorted(counts)}")
        flat = [shot for shots in shot_sets for shot in shots]
        feats = self.image_features([s.preferred for s in flat] + [s.dispreferred for s in flat])
        feats = feats.detach().float().cpu()
        diffs = (feats[: len(flat)] - feats[len(flat):]) * self.scale
        return diffs.reshape(len(shot_sets), counts.pop(), -1)
