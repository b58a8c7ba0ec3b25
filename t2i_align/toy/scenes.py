"""Toy-world scenes: five attributes, rendered as small RGB images, with short and long captions.

A scene is one coloured shape on a plain background. The judge (`judge.py`) knows the scene that was asked for
and checks every attribute, so methods can be measured against ground truth.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

PAIR_SEED = 500_000
"""Default base seed of pair sampling: its noises (500000 + 10000·k + i) are none of those an evaluation at seed 0,
100000 or 1000000 starts from (pairs at seed 1 shared 472 of the 480 held-out noises judged at seed 0)."""


IMAGE_SIZE = 32

OBJECT_COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("color", "shape", "size", "position", "background")
VALUES: Dict[str, Tuple[str, ...]] = {
    "color": tuple(OBJECT_COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Half-extent of a shape in pixels by size; quadrant centres leave a margin so shapes stay inside the frame.
RADIUS = {"small": 4.0, "large": 7.0}
QUADRANT_CENTER = {"top left": (9.0, 9.0), "top right": (9.0, 23.0),
                   "bottom left": (23.0, 9.0), "bottom right": (23.0, 23.0)}
JITTER = 1.5


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, str]) -> "Scene":
        scene = cls(**{k: d[k] for k in ATTRIBUTES})
        for attr in ATTRIBUTES:
            if getattr(scene, attr) not in VALUES[attr]:
                raise ValueError(f"unknown {attr} {getattr(scene, attr)!r}; expected one of {VALUES[attr]}")
        return scene


def all_scenes() -> List[Scene]:
    """Every attribute combination (5·3·2·4·3 = 360 scenes), in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(*(VALUES[a] for a in ATTRIBUTES))]


def split_scenes(num_heldout: int = 60, seed: int = 1234) -> Tuple[List[Scene], List[Scene]]:
    """Fixed (train, heldout) split of the scene combinations: no fine-tuning data (pairs, RAFT / online prompts,
    captions) draws a held-out scene. The base model's training captions carry label noise (`build._caption`), and
    13 % of its short captions happen to spell a held-out scene (paired with another scene's image); the toy
    Denscore's counterfactual negatives include held-out scenes (`denscore.py`), and so do the toy PPD pools'
    captions (`benchmarks/toy_ppd.py`, users' tastes over every scene)."""
    scenes = all_scenes()
    order = list(range(len(scenes)))
    random.Random(seed).shuffle(order)
    held = set(order[:num_heldout])
    train = [s for i, s in enumerate(scenes) if i not in held]
    heldout = [s for i, s in enumerate(scenes) if i in held]
    return train, heldout


def short_caption(scene: Scene) -> str:
    """One sentence naming all five attributes."""
    return f"a {scene.size} {scene.color} {scene.shape} at the {scene.position} on a {scene.background} background"


_FILLER = (
    "There is nothing else in the picture, no text, no texture and no other objects of any kind.",
    "The edges of the shape are crisp and its colour is perfectly uniform from one side to the other.",
    "The lighting is flat and even, so there are no shadows, highlights or reflections anywhere at all.",
    "It looks like a simple flat illustration that was drawn for a children's book about shapes.",
)


def long_caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Six sentences (> 77 CLIP tokens). The background colour comes last, so an encoder that truncates at
    77 tokens never sees it: a long-text encoder (LongAlign's segment encoding) is needed to follow it."""
    rng = rng or random.Random(0)
    fillers = list(_FILLER)
    rng.shuffle(fillers)
    return " ".join([
        f"The picture shows a single {scene.color} {scene.shape}.",
        fillers[0],
        f"The {scene.shape} is {scene.size} and it sits in the {scene.position} part of the frame.",
        fillers[1],
        fillers[2],
        f"Behind the {scene.color} {scene.shape}, the whole background is plain {scene.background}.",
    ])


def sample_scene(rng: random.Random, pool: Sequence[Scene]) -> Scene:
    return pool[rng.randrange(len(pool))]


def noisy_scene(scene: Scene, rng: random.Random, noise: float, keep: Sequence[str] = ("color",)) -> Scene:
    """The same scene with each attribute not in `keep` replaced by a uniformly random value with prob `noise`.
    Used to caption training images with deliberate label noise, so the base model leaves room for tuning."""
    d = scene.as_dict()
    for attr in ATTRIBUTES:
        if attr not in keep and rng.random() < noise:
            d[attr] = rng.choice(VALUES[attr])
    return Scene(**d)


def _shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    """Boolean mask of a shape, rendered with 4x4 supersampling and thresholded at half coverage."""
    ss = 4
    grid = (np.arange(size * ss) + 0.5) / ss
    y, x = np.meshgrid(grid, grid, indexing="ij")
    dy, dx = y - cy, x - cx
    if shape == "circle":
        inside = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "square":
        h = r * 0.9
        inside = (np.abs(dy) <= h) & (np.abs(dx) <= h)
    elif shape == "triangle":  # upright isosceles: apex at top, base at bottom
        h = r * 1.1
        frac = (dy + h) / (2 * h)  # 0 at apex, 1 at base
        inside = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * h * 1.15)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    coverage = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))
    return coverage >= 0.5


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene as a uint8 array [H, W, 3]. `rng` jitters the position slightly (None: exact centre)."""
    cy, cx = QUADRANT_CENTER[scene.position]
    scale = size / IMAGE_SIZE
    if rng is not None:
        cy += rng.uniform(-JITTER, JITTER)
        cx += rng.uniform(-JITTER, JITTER)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    mask = _shape_mask(scene.shape, cy * scale, cx * scale, RADIUS[scene.size] * scale, size)
    img[mask] = OBJECT_COLORS[scene.color]
    return img


def partial_caption(scene: Scene, attrs: Sequence[str]) -> str:
    """A phrase naming only `attrs` (e.g. "a red shape on a gray background"): trains the toy CLIP to score
    single facts, which LongAlign's sentence-level reward relies on."""
    words = ["a"]
    if "size" in attrs:
        words.append(scene.size)
    if "color" in attrs:
        words.append(scene.color)
    words.append(scene.shape if "shape" in attrs else "shape")
    if "position" in attrs:
        words.append(f"at the {scene.position}")
    if "background" in attrs:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


_LONG_FACTS = (
    re.compile(r"The picture shows a single (?P<color>\w+) (?P<shape>\w+)\."),
    re.compile(r"The (?P<shape>\w+) is (?P<size>\w+) and it sits in the (?P<position>\w+ \w+) part of the frame\."),
    re.compile(r"Behind the (?P<color>\w+) (?P<shape>\w+), the whole background is plain (?P<background>\w+)\."),
)


def scene_from_long_caption(caption: str) -> Scene:
    """Invert `long_caption` (whatever the order of its filler sentences); ValueError if it is not one."""
    found: Dict[str, str] = {}
    for pattern in _LONG_FACTS:
        match = pattern.search(caption)
        if match is None:
            raise ValueError(f"not a toy long caption: {caption!r}")
        for key, value in match.groupdict().items():
            if found.setdefault(key, value) != value:
                raise ValueError(f"toy long caption names two {key}s: {caption!r}")
    return Scene.from_dict(found)


def scene_from_caption(caption: str) -> Scene:
    """Invert `short_caption` (or `long_caption`), so a judge-based reward can score (image, prompt) pairs from
    the prompt alone."""
    words = caption.strip().split()
    # "a {size} {color} {shape} at the {v} {h} on a {background} background"
    if len(words) != 12 or words[0] != "a" or words[4:6] != ["at", "the"] or words[8:10] != ["on", "a"] \
            or words[-1] != "background":
        if caption.strip().startswith("The picture shows"):
            return scene_from_long_caption(caption.strip())
        raise ValueError(f"not a toy short caption (nor a long one): {caption!r}")
    return Scene.from_dict({"size": words[1], "color": words[2], "shape": words[3],
                            "position": f"{words[6]} {words[7]}", "background": words[10]})
