"""The shapes world (docs/design.md §7): an offline, deterministic stand-in for COCO.

Images are small RGB pictures on a light background with one or two solid shapes; every caption names each object
as "[size] <colour> <shape>" (colour directly before its shape). `generate_world` writes a Karpathy-style
`dataset_coco.json` + `images/` folder that the normal readers read, with splits

    pretrain  the encoder-pretraining set, drawn from the *whole* world
    train / val / test   ClipCap's pairs and the in-domain test: never contain a NOVEL composition
    novel     images that contain a purple triangle or a yellow square (the nocaps analogue)

Captions come in one of two STYLES: `plain` (the English of the LM's pretraining text) or `catalogue`, a terse
listing of the same facts in words and punctuation that text never uses ("triangle (purple, large) west of circle
(red)."): the stand-in for a dataset whose caption style is far from the LM's pretraining (the paper's Conceptual
Captions against COCO). Both are scoreable: `plain_caption` rewrites a catalogue caption in plain words first.

The captions of a two-object scene name either object first ("a red circle to the left of a blue square." / "a blue
square to the right of a red circle."). With `training_order="reading"` the captioning training pairs (train, val)
name the upper or left object first; the evaluation splits and the encoder-pretraining text keep both orders
(docs/design.md §7.1: the demo's tiny LM states above/below at chance when it may name either object first).

`object_pairs` and `binding_accuracy` read generated captions back into (colour, shape) pairs, so a caption that
says "purple square ... triangle" does not count as naming a purple triangle. `relation_accuracy` also reads where
things are: the relation a two-object caption states (in either order of mention) and a single object's position,
and `caption_error` names what a caption got wrong.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import ClipCapError

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.20, "large": 0.45}  # fraction of the image side
NOVEL = (("purple", "triangle"), ("yellow", "square"))  # never in ClipCap's train/val/test pairs
POSITIONS = {  # single object: centre as a fraction of the side, and how captions say it
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
RELATIONS = {  # two objects: "A <relation> B", A's and B's centres, and the inverse relation
    "left of": ((0.25, 0.5), (0.75, 0.5), "right of"),
    "right of": ((0.75, 0.5), (0.25, 0.5), "left of"),
    "above": ((0.5, 0.25), (0.5, 0.75), "below"),
    "below": ((0.5, 0.75), (0.5, 0.25), "above"),
}
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
SPLITS = ("pretrain", "train", "val", "test", "novel")
DEFAULT_COUNTS = {"pretrain": 20000, "train": 15000, "val": 500, "test": 1000, "novel": 1000}
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges
DATASET_NAME = "dataset_coco.json"

_SINGLE_TEMPLATES = (
    "a {obj} {where}.",
    "there is a {obj} {where}.",
    "a picture of a {obj} {where}.",
    "a {obj} is {where}.",
    "an image with a {obj} {where}.",
)
_PAIR_TEMPLATES = (
    "a {a} {rel} a {b}.",
    "there is a {a} {rel} a {b}.",
    "a picture of a {a} {rel} a {b}.",
    "a {a} is {rel} a {b}.",
)
STYLES = ("plain", "catalogue")
ORDERS = ("any", "reading")  # which object a two-object caption names first: either, or the upper / left one
_READ_FIRST = ("left of", "above")  # layouts whose first object (objects[0]) is the upper / left one
# The catalogue style: one template per plain template (same order), so a world's scenes and which caption variants
# each image gets do not depend on the style; only the words do.
_CATALOGUE_SINGLE = (
    "{obj}, {where}.",
    "1 shape: {obj}, {where}.",
    "shape: {obj}; place: {where}.",
    "{where}: {obj}.",
    "item {obj} at {where}.",
)
_CATALOGUE_PAIR = (
    "{a} {rel} {b}.",
    "2 shapes: {a} {rel} {b}.",
    "shapes: {a}; {rel} {b}.",
    "pair {a} | {rel} | {b}.",
)
CATALOGUE_POSITIONS = {"left": "west", "right": "east", "top": "north", "bottom": "south", "center": "middle"}
CATALOGUE_RELATIONS = {"left of": "west of", "right of": "east of", "above": "north of", "below": "south of"}
_CATALOGUE_OBJECT_RE = re.compile(
    r"\b(" + "|".join(SHAPES) + r") \((" + "|".join(COLOURS) + r")(?:, (" + "|".join(SIZES) + r"))?\)"
)
_CATALOGUE_RELATION_RE = re.compile(r"\b(" + "|".join(w.split()[0] for w in CATALOGUE_RELATIONS.values()) + r") of\b")
_CATALOGUE_POSITION_RE = re.compile(r"\b(" + "|".join(CATALOGUE_POSITIONS.values()) + r")\b")
_PAIR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
_OBJECT_RE = re.compile(r"\b(?:(" + "|".join(SIZES) + r") )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
_RELATION_RE = re.compile(r"\b(" + "|".join(RELATION_WORDS.values()) + r")\b")
_POSITION_RE = re.compile(r"\b(" + "|".join(words for _, words in POSITIONS.values()) + r")\b")


@dataclass(frozen=True)
class Shape:
    """One object: shape, colour and size words, the actual RGB fill, and its box in pixels (x0, y0, x1, y1)."""

    shape: str
    colour: str
    size: str
    rgb: tuple[int, int, int]
    box: tuple[float, float, float, float]

    @property
    def is_novel(self) -> bool:
        return (self.colour, self.shape) in NOVEL


@dataclass(frozen=True)
class Scene:
    """One or two objects; `layout` is a POSITIONS key (one object) or a RELATIONS key (objects[0] rel objects[1])."""

    objects: tuple[Shape, ...]
    layout: str
    background: tuple[int, int, int]

    @property
    def is_novel(self) -> bool:
        return any(o.is_novel for o in self.objects)


def _phrase(obj: Shape, with_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def _with_article(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _catalogue_phrase(obj: Shape, with_size: bool) -> str:
    return f"{obj.shape} ({obj.colour}, {obj.size})" if with_size else f"{obj.shape} ({obj.colour})"


def captions(scene: Scene, rng: np.random.Generator, n: int = 5, style: str = "plain", order: str = "any") -> list[str]:
    """`n` distinct captions for `scene` (templates x with/without size words x both relation directions) in one of
    STYLES. The style changes the words only: the same rng state picks the same variants in either style. With
    `order="reading"` a two-object caption names the upper / left object first: the variants picked are turned
    round where they name the other first, so two of the `n` may be the same words (kept: every image keeps `n`
    captions, and a world's pairs differ from the order "any" in their order of mention only); the rng draws
    exactly what it draws in the order "any", so a world's scenes do not depend on the order."""
    if style not in STYLES:
        raise ClipCapError(f"caption style must be one of {', '.join(STYLES)}, got {style!r}")
    if order not in ORDERS:
        raise ClipCapError(f"caption order must be one of {', '.join(ORDERS)}, got {order!r}")
    plain = style == "plain"
    phrase = _phrase if plain else _catalogue_phrase
    options = []
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        where = POSITIONS[scene.layout][1] if plain else CATALOGUE_POSITIONS[scene.layout]
        for template in _SINGLE_TEMPLATES if plain else _CATALOGUE_SINGLE:
            for with_size in (True, False):
                options.append(template.format(obj=phrase(obj, with_size), where=where))
    else:
        a, b = scene.objects
        inverse = RELATIONS[scene.layout][2]
        words = RELATION_WORDS if plain else CATALOGUE_RELATIONS
        for template in _PAIR_TEMPLATES if plain else _CATALOGUE_PAIR:
            for with_size in (True, False):
                for first, second, rel in ((a, b, scene.layout), (b, a, inverse)):
                    options.append(
                        template.format(a=phrase(first, with_size), b=phrase(second, with_size), rel=words[rel])
                    )
    picks = rng.choice(len(options), size=min(n, len(options)), replace=False)
    if order == "reading" and len(scene.objects) == 2:
        # options alternate direction: even = objects[0] first, odd = objects[1] first
        first = 0 if scene.layout in _READ_FIRST else 1
        picks = [i - i % 2 + first for i in picks]
    return [_with_article(options[i]) if plain else options[i] for i in picks]


def plain_caption(text: str) -> str:
    """A caption in plain words: catalogue phrases ("triangle (purple, large)", "west of", "north") rewritten as the
    plain style says them ("large purple triangle", "to the left of", "at the top"); plain text is returned as is."""
    text = _CATALOGUE_OBJECT_RE.sub(lambda m: " ".join(w for w in (m.group(3), m.group(2), m.group(1)) if w), text)
    relations = {words.split()[0]: RELATION_WORDS[key] for key, words in CATALOGUE_RELATIONS.items()}
    text = _CATALOGUE_RELATION_RE.sub(lambda m: relations[m.group(1)], text)
    positions = {words: POSITIONS[key][1] for key, words in CATALOGUE_POSITIONS.items()}
    return _CATALOGUE_POSITION_RE.sub(lambda m: positions[m.group(1)], text)


def _box(centre: tuple[float, float], side: float, size: int) -> tuple[float, float, float, float]:
    half = side / 2
    cx = min(max(centre[0], half), size - half)
    cy = min(max(centre[1], half), size - half)
    return (cx - half, cy - half, cx + half, cy + half)


def _overlap(a, b, margin: float = 1.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw_object(rng: np.random.Generator, size: int, centre, allowed) -> Shape:
    shape, colour = allowed[rng.integers(len(allowed))]
    size_word = ("small", "large")[rng.integers(2)]
    side = SIZES[size_word] * size * rng.uniform(0.9, 1.1)
    jitter = rng.uniform(-0.05, 0.05, size=2) * size
    box = _box((centre[0] * size + jitter[0], centre[1] * size + jitter[1]), side, size)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255))
    return Shape(shape, colour, size_word, rgb, box)


def sample_scene(rng: np.random.Generator, image_size: int = 40, novel: bool | None = None) -> Scene:
    """Draw a scene. `novel=None`: the whole world; False: no NOVEL composition; True: at least one."""
    every = [(s, c) for s in SHAPES for c in COLOURS]
    familiar = [(s, c) for s, c in every if (c, s) not in NOVEL]
    novel_only = [(s, c) for s, c in every if (c, s) in NOVEL]
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    two = bool(rng.integers(2))
    while True:
        if not two:
            layout = list(POSITIONS)[rng.integers(len(POSITIONS))]
            pool = every if novel is None else (novel_only if novel else familiar)
            objects = (_draw_object(rng, image_size, POSITIONS[layout][0], pool),)
        else:
            layout = list(RELATIONS)[rng.integers(len(RELATIONS))]
            centre_a, centre_b, _ = RELATIONS[layout]
            if novel:  # one object is novel (either one), the other from the whole world
                pools = (novel_only, every) if rng.integers(2) else (every, novel_only)
            else:
                pools = (every, every) if novel is None else (familiar, familiar)
            objects = (
                _draw_object(rng, image_size, centre_a, pools[0]),
                _draw_object(rng, image_size, centre_b, pools[1]),
            )
            if _overlap(objects[0].box, objects[1].box):
                continue
        return Scene(objects, layout, background)


def render(scene: Scene, image_size: int = 40, rng: np.random.Generator | None = None, noise: float = 3.0):
    """Scene -> RGB PIL image (anti-aliased; faint Gaussian noise of std `noise` when an rng is given)."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj.box)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=obj.rgb)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if rng is not None and noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, size=(image_size, image_size, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


def generate_world(
    out: str | Path,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    image_size: int = 40,
    captions_per_image: int = 5,
    progress: bool = True,
    style: str = "plain",
    training_order: str = "any",
) -> Path:
    """Write `out/images/*.png` and `out/dataset_coco.json` (Karpathy format, splits per SPLITS); return the json.

    `counts` maps split -> number of images (missing splits: DEFAULT_COUNTS; 0 skips a split). The same seed gives
    the same world, split by split, whatever the other splits' counts. Each image entry also records its scene
    (`objects`, `layout`) for scoring. `style` (one of STYLES) changes the captions' words only, not the scenes;
    `training_order` (one of ORDERS) is the order of mention in the train and val splits' two-object captions."""
    if style not in STYLES:
        raise ClipCapError(f"caption style must be one of {', '.join(STYLES)}, got {style!r}")
    if training_order not in ORDERS:
        raise ClipCapError(f"training caption order must be one of {', '.join(ORDERS)}, got {training_order!r}")
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ClipCapError(f"unknown shapes-world split(s) {unknown}; the splits are {', '.join(SPLITS)}")
    if image_size < 16:
        raise ClipCapError(f"image_size must be at least 16 pixels, got {image_size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    total = sum(counts[s] for s in SPLITS)
    with tqdm(total=total, desc="shapes world", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            rng = _split_rng(seed, split)
            novel = {"pretrain": None, "novel": True}.get(split, False)
            for i in range(counts[split]):
                scene = sample_scene(rng, image_size, novel=novel)
                filename = f"{split}_{i:06d}.png"
                render(scene, image_size, rng).save(out / "images" / filename)
                imgid = len(entries)
                order = training_order if split in ("train", "val") else "any"
                texts = captions(scene, rng, captions_per_image, style, order)
                entries.append(
                    {
                        "filepath": "images",
                        "filename": filename,
                        "imgid": imgid,
                        "cocoid": imgid,
                        "split": split,
                        "sentences": [
                            {"raw": t, "tokens": t.rstrip(".").split(), "imgid": imgid, "sentid": imgid * 100 + j}
                            for j, t in enumerate(texts)
                        ],
                        "sentids": [imgid * 100 + j for j in range(len(texts))],
                        "layout": scene.layout,
                        "objects": [{k: v for k, v in asdict(o).items() if k != "rgb"} for o in scene.objects],
                    }
                )
                bar.update()
    path = out / DATASET_NAME
    path.write_text(
        json.dumps({"dataset": "shapes", "style": style, "training_order": training_order, "images": entries})
    )
    return path


def object_pairs(text: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a caption names with the colour directly before its shape (a size word may precede), or
    in the catalogue style as "shape (colour[, size])"."""
    return [(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(plain_caption(text.lower()))]


def binding_accuracy(predictions: list[str], references: list[list[str]]) -> dict[str, float | int]:
    """How often generated captions name the right colour attached to the right shape.

    The truth is read from the references (each names every object as "[size] colour shape"). Returns
    `single` (fraction of one-object images whose caption names exactly that object), `objects` (fraction of all
    objects named), `images_exact` (fraction of images whose named pairs equal the truth) and the counts."""
    if len(predictions) != len(references):
        raise ClipCapError(f"{len(predictions)} predictions but {len(references)} reference lists")
    single = single_ok = objects = objects_ok = exact = 0
    for prediction, refs in zip(predictions, references, strict=True):
        truth = object_pairs(refs[0]) if refs else []
        named = object_pairs(prediction)
        objects += len(truth)
        objects_ok += sum(pair in named for pair in truth)
        same = sorted(named) == sorted(truth)
        exact += same
        if len(truth) == 1:
            single += 1
            single_ok += same
    return {
        "single": single_ok / single if single else float("nan"),
        "objects": objects_ok / objects if objects else float("nan"),
        "images_exact": exact / len(predictions) if predictions else float("nan"),
        "num_images": len(predictions),
        "num_single": single,
        "num_objects": objects,
    }


@dataclass(frozen=True)
class Statement:
    """What a caption says: the objects it names as (size or None, colour, shape), in order of mention, and the
    relation stated between the first two (a RELATIONS key) or the single object's position (a POSITIONS key)."""

    objects: tuple[tuple[str | None, str, str], ...]
    relation: str | None = None
    position: str | None = None

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return sorted((colour, shape) for _, colour, shape in self.objects)


def read_caption(text: str) -> Statement:
    """Parse a caption into a Statement. A relation counts only when exactly one relation phrase stands between the
    first two objects named ("a red circle to the left of a blue square"); a position only for one object. Either
    caption style is read."""
    text = plain_caption(text.lower())
    found = list(_OBJECT_RE.finditer(text))
    objects = tuple((m.group(1), m.group(2), m.group(3)) for m in found)
    relation = position = None
    if len(found) >= 2:
        stated = _RELATION_RE.findall(text[found[0].end() : found[1].start()])
        if len(stated) == 1:
            relation = {words: key for key, words in RELATION_WORDS.items()}[stated[0]]
    elif len(found) == 1:
        stated = _POSITION_RE.findall(text)
        if len(stated) == 1:
            position = {words: key for key, (_, words) in POSITIONS.items()}[stated[0]]
    return Statement(objects, relation, position)


def _truth(references: list[str]) -> Statement:
    """The scene as the references describe it: the first reference that states sizes (they tell two objects of one
    colour and shape apart), else the first."""
    statements = [read_caption(r) for r in references]
    with_sizes = [s for s in statements if s.objects and all(size for size, _, _ in s.objects)]
    return (with_sizes or statements or [Statement(())])[0]


def _relation_holds(said: Statement, truth: Statement) -> bool:
    """Whether `said`'s relation between its two objects is true of the scene `truth` describes, whichever order the
    objects are mentioned in. Objects are matched by colour and shape; stated sizes settle ties."""
    if said.relation is None or truth.relation is None or len(said.objects) != 2 or len(truth.objects) != 2:
        return False
    inverse = RELATIONS[truth.relation][2]

    def same(a, b, sizes: bool) -> bool:
        return a[1:] == b[1:] and (not sizes or a[0] is None or b[0] is None or a[0] == b[0])

    for sizes in (True, False):  # sizes first; if no order fits them, colour and shape alone
        orders = [
            relation
            for (i, j), relation in (((0, 1), truth.relation), ((1, 0), inverse))
            if same(said.objects[0], truth.objects[i], sizes) and same(said.objects[1], truth.objects[j], sizes)
        ]
        if orders:
            return said.relation in orders
    return False


def caption_error(prediction: str, references: list[str]) -> str | None:
    """What is wrong with a caption of a scene its references describe, as one category; None when it names every
    object (colour on shape) and where it is (a single object's position, a pair's relation) right."""
    said, truth = read_caption(prediction), _truth(references)
    named, real = said.pairs, truth.pairs
    if len(named) != len(real):
        return "wrong number of objects"
    if named != real:
        if len(real) == 1:
            (colour, shape), (true_colour, true_shape) = named[0], real[0]
            return "wrong shape" if colour == true_colour else "wrong colour" if shape == true_shape else "wrong object"
        if named[0] == named[1] and real[0] != real[1]:
            return "one object named twice"
        colours, shapes = (sorted(p[i] for p in named) == sorted(p[i] for p in real) for i in (0, 1))
        if colours and shapes:
            return "colours and shapes bound the other way"
        (missing, *rest), (wrong, *_) = (
            (Counter(a) - Counter(b)).elements() for a, b in ((real, named), (named, real))
        )
        if rest:
            return "both objects wrong"
        if wrong[0] == missing[0]:
            return "one object: wrong shape"
        return "one object: wrong colour" if wrong[1] == missing[1] else "one object: wrong object"
    if len(real) == 1:
        return None if said.position == truth.position else "wrong position"
    if said.relation is None:
        return "no relation stated"
    if _relation_holds(said, truth):
        return None
    flipped = Statement(said.objects, RELATIONS[said.relation][2])
    return "relation reversed" if _relation_holds(flipped, truth) else "relation on the wrong axis"


def relation_accuracy(predictions: list[str], references: list[list[str]]) -> dict:
    """Where things are, scored from the captions alone (the truth is read from each image's references).

    Returns `pairs_exact` (two-object images whose caption names exactly both objects, colour on shape),
    `relation_right` (two-object images named exactly whose stated relation, in either order of mention, holds),
    `position_right` (one-object images named exactly at the right position), their counts, and `errors`: how many
    captions fell in each `caption_error` category."""
    if len(predictions) != len(references):
        raise ClipCapError(f"{len(predictions)} predictions but {len(references)} reference lists")
    pairs = pairs_exact = relation_right = singles = position_right = 0
    errors: dict[str, int] = {}
    for prediction, refs in zip(predictions, references, strict=True):
        said, truth = read_caption(prediction), _truth(refs)
        exact = said.pairs == truth.pairs
        error = caption_error(prediction, refs)
        if error is not None:
            errors[error] = errors.get(error, 0) + 1
        if len(truth.objects) == 2:
            pairs += 1
            pairs_exact += exact
            relation_right += exact and _relation_holds(said, truth)
        elif len(truth.objects) == 1:
            singles += 1
            position_right += exact and said.position == truth.position
    return {
        "pairs_exact": pairs_exact / pairs if pairs else float("nan"),
        "relation_right": relation_right / pairs if pairs else float("nan"),
        "position_right": position_right / singles if singles else float("nan"),
        "num_pairs": pairs,
        "errors": dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
