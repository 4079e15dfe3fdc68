"""The pre-training domain of the tiny base: coloured shapes and generic toy robots, captioned by what is drawn.

Each picture is one object — a ``circle``, ``square``, ``triangle`` or ``toy robot`` — in one of
:data:`COLOURS`, scaled, rotated and placed like the sample dataset's subject, on either a plain named
background (:data:`BACKGROUNDS`, named in the caption) or unnamed scenery (a gradient, a floor and a little
clutter, as in the sample photos). Captions vary their template ("a photo of a red square", "red square,
gray background", "a photo of toy robot", …) so that the words the personalisation prompts use ("a photo
of", the class noun "toy robot") carry meaning before fine-tuning.

The sample dataset's subject (orange body, teal head, white star: :data:`sdtune.data.sample.SUBJECT_PALETTE`)
is never drawn here: a generic robot has one colour for body and head and no star, and the trigger word never
appears in a caption. :data:`HELD_OUT` (colour, object) pairs are never drawn either, so the conditioning
gates measure generalisation, not memory.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from sdtune.data.sample import DARK, draw_robot, muted_colour

COLOURS = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 180),
    "pink": (250, 130, 190),
}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25)}
OBJECTS = ("circle", "square", "triangle", "toy robot")
HELD_OUT = {
    ("red", "square"),
    ("green", "triangle"),
    ("blue", "toy robot"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("pink", "circle"),
}
RENDER_SCALE = 4  # draw at 4× and downsample with a filter, as preprocessing does to a large photo

_WITH_COLOUR = (
    "a photo of a {c} {n}",
    "a photo of {c} {n}",
    "a {c} {n}",
    "a picture of a {c} {n}",
    "{c} {n}",
)
_WITHOUT_COLOUR = ("a photo of {n}", "a photo of a {n}", "a {n}", "a picture of a {n}")
_WITH_BACKGROUND = ("{x}, {b} background", "{x} on a {b} background")


@dataclass(frozen=True)
class Scene:
    colour: str
    obj: str
    background: str | None  # a name of BACKGROUNDS, or None for unnamed scenery


def training_pairs() -> list[tuple[str, str]]:
    return [(c, o) for c in COLOURS for o in OBJECTS if (c, o) not in HELD_OUT]


def random_scene(rng: random.Random, pairs: list[tuple[str, str]] | None = None) -> Scene:
    colour, obj = rng.choice(pairs or training_pairs())
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.6 else None
    return Scene(colour, obj, background)


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene`` in a random template; the colour is left out of 15 % of them."""
    if rng.random() < 0.15:
        text = rng.choice(_WITHOUT_COLOUR).format(n=scene.obj)
    else:
        text = rng.choice(_WITH_COLOUR).format(c=scene.colour, n=scene.obj)
    if scene.background and rng.random() < 0.7:
        text = rng.choice(_WITH_BACKGROUND).format(x=text, b=scene.background)
    return text


def render(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    """``scene`` as an RGB ``size``×``size`` picture; the pose, placement and scenery come from ``rng``."""
    big = size * RENDER_SCALE
    image = _background(scene.background, big, rng)
    obj_size = int(big * rng.uniform(0.45, 0.85))
    layer = _object(scene, obj_size, rng)
    layer = layer.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)
    x = rng.randrange(0, max(1, big - layer.width))
    y = rng.randrange(0, max(1, big - layer.height))
    image.paste(layer, (x, y), layer)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _background(name: str | None, size: int, rng: random.Random) -> Image.Image:
    if name is not None:
        shade = rng.randint(-12, 12)
        return Image.new("RGB", (size, size), tuple(min(255, max(0, v + shade)) for v in BACKGROUNDS[name]))
    # Unnamed scenery: muted gradient, floor, clutter (the colours stay greyish so no subject palette appears).
    top, bottom = muted_colour(rng), muted_colour(rng)
    image = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(image)
    for y in range(size):
        t = y / (size - 1)
        d.line([0, y, size, y], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    d.rectangle([0, int(size * rng.uniform(0.6, 0.85)), size, size], fill=tuple(c // 2 for c in bottom))
    for _ in range(rng.randrange(1, 4)):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(4, size // 6)
        d.ellipse([x - r, y - r, x + r, y + r], fill=muted_colour(rng))
    return image


def _object(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    colour = COLOURS[scene.colour]
    if scene.obj == "toy robot":
        shade = tuple(int(v * 0.6) for v in colour)
        palette = {"body": colour, "head": colour, "eyes": (250, 250, 250), "antenna": DARK, "arms": shade}
        return draw_robot(size, rng, palette)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    m = size * 0.08
    if scene.obj == "circle":
        d.ellipse([m, m, size - m, size - m], fill=colour)
    elif scene.obj == "square":
        d.rectangle([m, m, size - m, size - m], fill=colour)
    else:
        r = (size - 2 * m) / 2
        c = size / 2
        points = [
            (c + r * math.cos(a), c - r * math.sin(a))
            for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        ]
        d.polygon(points, fill=colour)
    return layer
