"""An independent renderer of shapes-world scenes, for testing the demo's model on pictures the project's own
renderer (clipcap.demo.world.render) never drew.

Only the world's specification is shared (DESIGN §7): the six colour centres with ±20 jitter, circle / square /
triangle, small ≈ 20 % and large ≈ 45 % of the side, a single object at left / right / top / bottom / center, two
objects related by left of / right of / above / below. Everything else is drawn differently: shapes are rasterised
here with numpy from per-pixel coverage (8 x 8 subsamples) instead of PIL's polygon fill at 4x and a box filter;
sizes, places, background, colour jitter and noise come from other distributions (normal rather than uniform
jitter, a per-image background gradient instead of a flat fill); and the triangle is equilateral-looking (its
height 0.9 of its base) instead of filling its box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CENTRES = {  # the specification's RGB centres
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIDE = {"small": 0.20, "large": 0.45}
NOVEL = {("purple", "triangle"), ("yellow", "square")}
SINGLE_AT = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
SINGLE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                "center": "in the center"}  # fmt: skip
PAIR_AT = {"left of": ((0.26, 0.5), (0.74, 0.5)), "right of": ((0.74, 0.5), (0.26, 0.5)),
           "above": ((0.5, 0.26), (0.5, 0.74)), "below": ((0.5, 0.74), (0.5, 0.26))}  # fmt: skip
PAIR_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def _coverage(shape: str, cx: float, cy: float, side: float, n: int, sub: int = 8) -> np.ndarray:
    """Fraction of each of n x n pixels inside the shape, from sub x sub sample points per pixel."""
    ticks = (np.arange(n * sub) + 0.5) / sub
    x, y = np.meshgrid(ticks, ticks)
    dx, dy, half = x - cx, y - cy, side / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # apex up, base at the bottom, height 0.9 of the base
        height = 0.9 * side
        top, bottom = cy - height / 2, cy + height / 2
        t = np.clip((y - top) / height, 0, None)  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(dx) <= t * half)
    return inside.reshape(n, sub, n, sub).mean(axis=(1, 3))


def draw(things: list[tuple[Thing, tuple[float, float]]], rng: np.random.Generator, n: int = 40) -> np.ndarray:
    """RGB uint8 (n, n, 3): a light background with a gentle gradient, each thing at its centre (fractions)."""
    base = rng.uniform(205, 250, size=3)
    slope = rng.normal(0, 4, size=(2, 3))
    ramp = np.linspace(-1, 1, n)
    image = base + ramp[None, :, None] * slope[0] + ramp[:, None, None] * slope[1]
    for thing, (fx, fy) in things:
        side = SIDE[thing.size] * n * rng.normal(1.0, 0.04)
        colour = np.clip(np.array(CENTRES[thing.colour]) + np.clip(rng.normal(0, 8, size=3), -20, 20), 0, 255)
        cover = _coverage(thing.shape, fx * n, fy * n, side, n)[..., None]
        image = image * (1 - cover) + colour * cover
    image = image + rng.normal(0, 2.0, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _thing(rng: np.random.Generator, novel: bool | None) -> Thing:
    pool = [(c, s) for c in CENTRES for s in SHAPES]
    if novel is True:
        pool = sorted(NOVEL)
    elif novel is False:
        pool = [p for p in pool if p not in NOVEL]
    colour, shape = pool[rng.integers(len(pool))]
    return Thing(colour, shape, ("small", "large")[rng.integers(2)])


def single(rng: np.random.Generator, novel: bool) -> tuple[np.ndarray, str]:
    """A one-object picture and its caption (the truth, in the world's words)."""
    thing = _thing(rng, novel)
    where = list(SINGLE_AT)[rng.integers(len(SINGLE_AT))]
    jitter = rng.normal(0, 0.02, size=2)
    centre = tuple(np.clip(np.array(SINGLE_AT[where]) + jitter, 0.15, 0.85))
    return draw([(thing, centre)], rng), f"a {thing.words()} {SINGLE_WORDS[where]}."


def pair(rng: np.random.Generator, novel: bool) -> tuple[np.ndarray, str]:
    """A two-object picture and its caption; `novel`: one of the two (either) is a novel composition, the other
    any object; otherwise neither is novel."""
    relation = list(PAIR_AT)[rng.integers(len(PAIR_AT))]
    if novel:
        things = [_thing(rng, True), _thing(rng, None)]
        if rng.integers(2):
            things.reverse()
    else:
        things = [_thing(rng, False), _thing(rng, False)]
    placed = []
    for thing, centre in zip(things, PAIR_AT[relation], strict=True):
        jitter = rng.normal(0, 0.015, size=2)  # keeps two large objects apart
        placed.append((thing, tuple(np.array(centre) + jitter)))
    a, b = things
    caption = f"a {a.words()} {PAIR_WORDS[relation]} a {b.words()}."
    return draw(placed, rng), caption.replace(" a orange", " an orange").replace("a orange", "an orange", 1)
