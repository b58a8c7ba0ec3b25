"""The toy world's programmatic judge: reads every attribute off an image and compares with the scene asked for.

It measures pixels, it does not learn: background = median colour of the border ring; object = pixels far from
that colour; colour = nearest palette entry to the object's median colour; size = object area; position =
centroid quadrant; shape = the shape whose template (every shape, size and whole-pixel centre) overlaps the
object's mask best (intersection over union).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .scenes import ATTRIBUTES, BACKGROUNDS, IMAGE_SIZE, OBJECT_COLORS, RADIUS, SHAPES, Scene, _shape_mask

_MIN_OBJECT_PIXELS = 6
_OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel belongs to the object


@dataclass
class Verdict:
    predicted: Dict[str, Optional[str]]
    correct: Dict[str, bool]

    @property
    def score(self) -> float:
        """Fraction of the five attributes that match the scene asked for."""
        return sum(self.correct.values()) / len(self.correct)


def _nearest(rgb: np.ndarray, palette: Dict[str, tuple]) -> str:
    names = list(palette)
    dist = [float(np.sum((rgb - np.asarray(palette[n], dtype=np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


@functools.lru_cache(maxsize=1)
def _templates() -> Tuple[np.ndarray, List[str]]:
    """Masks of every shape, size and whole-pixel centre at IMAGE_SIZE, flattened: [N, H*W] float32."""
    masks, shapes = [], []
    centres = np.arange(3.0, IMAGE_SIZE - 2.0)
    for shape in SHAPES:
        for size in RADIUS:
            for cy in centres:
                for cx in centres:
                    masks.append(_shape_mask(shape, cy, cx, RADIUS[size], IMAGE_SIZE).ravel())
                    shapes.append(shape)
    return np.asarray(masks, dtype=np.float32), shapes


def _shape_by_template(mask: np.ndarray) -> str:
    """The shape whose best-placed template overlaps the object most (intersection over union)."""
    templates, shapes = _templates()
    m = mask.ravel().astype(np.float32)
    inter = templates @ m
    iou = inter / (templates.sum(1) + m.sum() - inter)
    return shapes[int(np.argmax(iou))]


def read_attributes(image: np.ndarray) -> Dict[str, Optional[str]]:
    """Predict each attribute from a uint8 [H, W, 3] image, judged at IMAGE_SIZE (the toy pipeline's; another square
    size is shrunk to it, and shrinking leaves a square's edge pixels halfway between two colours, so squares then
    read as circles more often). None where there is no object."""
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    img = image.astype(np.float32)
    size = IMAGE_SIZE
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    pred: Dict[str, Optional[str]] = {a: None for a in ATTRIBUTES}
    pred["background"] = _nearest(bg_rgb, BACKGROUNDS)
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > _OBJECT_DISTANCE
    if mask.sum() < _MIN_OBJECT_PIXELS:
        return pred
    obj_rgb = np.median(img[mask], axis=0)
    pred["color"] = _nearest(obj_rgb, OBJECT_COLORS)
    # Second pass: a pixel is object if it is nearer the object's colour than the background's (robust to JPEG).
    mask = ((img - obj_rgb) ** 2).sum(-1) < ((img - bg_rgb) ** 2).sum(-1)
    pred["shape"] = _shape_by_template(mask)
    # Threshold halfway (geometrically) between the areas of a small and a large circle.
    area_split = np.pi * RADIUS["small"] * RADIUS["large"]
    pred["size"] = "large" if mask.sum() > area_split else "small"
    ys, xs = np.nonzero(mask)
    vert = "top" if ys.mean() < size / 2 else "bottom"
    horiz = "left" if xs.mean() < size / 2 else "right"
    pred["position"] = f"{vert} {horiz}"
    return pred


def judge_image(image: np.ndarray, scene: Scene) -> Verdict:
    pred = read_attributes(image)
    correct = {a: pred[a] == getattr(scene, a) for a in ATTRIBUTES}
    return Verdict(predicted=pred, correct=correct)


def judge_batch(images: Sequence[np.ndarray], scenes: Sequence[Scene]) -> List[Verdict]:
    if len(images) != len(scenes):
        raise ValueError(f"judge got {len(images)} images but {len(scenes)} scenes")
    return [judge_image(im, sc) for im, sc in zip(images, scenes)]
