"""Scenes of shapes for the demo: pictures whose content can be learnt from text.

Each scene draws `count` shapes of one kind and one colour in one quadrant of a plain
background. Five attributes are drawn, and a web-like alt-text mentions only some of them
(or none: "stock photo 1234"), the way real alt-texts leave most of a picture unsaid. That is
the situation Holistic CLIP is about: one short text per image teaches only what the texts
mention, several texts from several perspectives teach more.

The generator also knows the truth, so it can write *reference texts*, one per perspective of
the default prompt set (detail, background, main object, style): what a good captioner would
say. The demo trains on them as a clearly labelled third run, to show what the method does with
informative captions when no real VLM can be had; they never pass for VLM output (their
provenance says `kind: reference`, source demo/scenes.py).
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 35, 35), "green": (35, 170, 50), "blue": (40, 70, 225), "yellow": (235, 210, 25)}
COUNTS = {"one": 1, "two": 2, "three": 3}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (125, 125, 125), "purple": (120, 50, 150)}
ATTRIBUTES = ("shape", "colour", "count", "position", "background")
# Zero-shot prompts per attribute ({} is the class name): what a user would type.
TEMPLATES = {
    "shape": ("a {}.", "a picture of a {}.", "{} shapes."),
    "colour": ("something {}.", "a {} shape.", "a picture in {}."),
    "count": ("{} shapes.", "a picture of {} shapes.", "{} objects."),
    "position": ("shapes at the {}.", "something in the {} corner.", "a picture with shapes at the {}."),
    "background": ("a {} background.", "shapes on a {} background.", "a plain {} background."),
}
REFERENCE_TEXTS = {  # text id -> (prompt id of the default set it stands in for)
    "ref/detail": "detail", "ref/background": "background", "ref/main_object": "main_object", "ref/style": "style",
}
WARM = {"red", "yellow"}
LIGHT = {"white", "gray"}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: str
    position: str
    background: str
    alt_text: str

    def labels(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def as_row(self) -> dict[str, str]:
        return asdict(self)


def plural(shape: str, count: str) -> str:
    if count == "one":
        return f"one {shape}"
    return f"{count} {'crosses' if shape == 'cross' else shape + 's'}"


def alt_text(rng: random.Random, shape: str, colour: str, count: str, background: str) -> str:
    """A partial, web-like alt-text: never the position, the background only sometimes."""
    forms = (
        lambda: f"{colour} {shape}",
        lambda: plural(shape, count),
        lambda: f"{colour} shapes",
        lambda: f"{shape} icon",
        lambda: f"{shape} on {background}",
        lambda: f"{plural(shape, count)} clipart",
        lambda: f"stock photo {rng.randrange(10000)}",
    )
    return rng.choice(forms)()


def make_scene(rng: random.Random) -> Scene:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    count, position, background = rng.choice(list(COUNTS)), rng.choice(POSITIONS), rng.choice(list(BACKGROUNDS))
    return Scene(shape, colour, count, position, background, alt_text(rng, shape, colour, count, background))


def draw(scene: Scene, size: int, seed: int) -> Image.Image:
    """The picture: `count` shapes side by side (or stacked) inside the scene's quadrant."""
    jitter = random.Random(seed)
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    x0 = 0 if "left" in scene.position else size / 2
    y0 = 0 if "top" in scene.position else size / 2
    n, half = COUNTS[scene.count], size / 2
    r = half * (0.30 if n == 1 else 0.22 if n == 2 else 0.16)
    fill = COLOURS[scene.colour]
    for i in range(n):
        # spread along the quadrant's diagonal so that the shapes never overlap
        t = (i + 1) / (n + 1)
        cx = x0 + half * t + jitter.uniform(-1.5, 1.5)
        cy = y0 + half * (t if n > 1 else 0.5) + jitter.uniform(-1.5, 1.5)
        draw_shape(pen, scene.shape, cx, cy, r, fill)
    return image


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int]) -> None:
    """One filled shape of SHAPES centred at (cx, cy), r pixels from the centre to its edge."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def reference_texts(labels: dict[str, str]) -> dict[str, str]:
    """What a good captioner would answer to each prompt of the default set, from the truth."""
    shape, colour, count = labels["shape"], labels["colour"], labels["count"]
    position, background = labels["position"], labels["background"]
    objects = f"{plural(shape, count)} in {colour}"
    mood = ("warm" if colour in WARM else "cool") + (" and bright" if background in LIGHT else " and dark")
    return {
        "ref/detail": f"{objects} at the {position} of a plain {background} background.",
        "ref/background": f"a plain {background} background.",
        "ref/main_object": f"{objects}.",
        "ref/style": f"a simple flat drawing with {mood} tones, {colour} on {background}.",
    }


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [make_scene(rng) for _ in range(count)]


# ----------------------------------------------------------------------------- reading captions

_MENTIONS = {
    "shape": {"circle": r"circles?", "square": r"squares?", "triangle": r"triangles?", "cross": r"cross(?:es)?"},
    "colour": {c: c for c in COLOURS},
    "count": {c: c for c in COUNTS},
    "position": {p: p.replace(" ", r"\s+") for p in POSITIONS},
    "background": {b: b for b in BACKGROUNDS},
}


def mentions(text: str) -> dict[str, set[str]]:
    """The values of each attribute a caption names (whole words, case-insensitive).

    The attributes' values are disjoint word sets (the shapes' colours are not the backgrounds'),
    so a caption's words tell which attribute they speak of.
    """
    import re

    low = text.lower()
    return {attribute: {value for value, pattern in values.items() if re.search(rf"\b{pattern}\b", low)}
            for attribute, values in _MENTIONS.items()}


def score_caption(text: str, labels: dict[str, str]) -> dict[str, bool]:
    """For each attribute the caption names: whether it names the truth and nothing else."""
    return {attribute: named == {labels[attribute]} for attribute, named in mentions(text).items() if named}
