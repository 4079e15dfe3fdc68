"""The pre-training domain of the tiny base: coloured shapes, generic toy robots and named robots, captioned.

Each picture is one object, large in the frame (it decides most of the picture, so the caption decides most of
the loss), slightly rotated, on a plain named background (:data:`BACKGROUNDS`):

- a generic ``circle`` or ``toy robot`` in one of :data:`COLOURS`, captioned colour first ("red
  circle, gray background", "a photo of a red toy robot, gray background");
- one of :data:`CHARACTERS`, a named robot always drawn with the same multi-colour palette, captioned by its
  name before the class noun ("a photo of bix toy robot, gray background"). So "<name> toy robot" means one
  specific robot and "toy robot" any robot: the structure a personalised subject ("sks toy robot") relies on
  in a real Stable Diffusion.

The sample dataset's subject (orange body, teal head, white star: :data:`sdtune.data.sample.SUBJECT_PALETTE`)
is never drawn here: no palette uses orange or teal, none has a star, and the trigger word never appears in a
caption. :data:`HELD_OUT` (colour, object) pairs are never drawn either, so the conditioning gates measure
generalisation, not memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from sdtune.data.sample import DARK, draw_robot

COLOURS = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 180),
    "pink": (250, 130, 190),
}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25)}
OBJECTS = ("circle", "toy robot")
HELD_OUT = {("blue", "toy robot"), ("green", "toy robot"), ("yellow", "circle"), ("pink", "circle")}
# Named robots: body and head colours from COLOURS (never the subject's orange and teal), arms a darker body.
CHARACTERS = {
    "bix": ("red", "blue"),
    "quolo": ("yellow", "purple"),
    "zemby": ("green", "pink"),
    "travik": ("blue", "yellow"),
    "munu": ("pink", "green"),
}
CHARACTER_SHARE = 0.2  # of the pictures; the rest are generic objects
RENDER_SCALE = 4  # draw at 4× and downsample with a filter, as preprocessing does to a large photo

# Every caption names the colour and the background: captions that sometimes leave the colour out or
# describe unnamed scenery are a harder mapping to learn in a CPU-sized budget.
_TEMPLATES = (
    "{c} {n}, {b} background",
    "{c} {n}, {b} background",
    "{c} {n}, {b} background",
    "a {c} {n} on a {b} background",
    "a photo of a {c} {n}, {b} background",
)
_CHARACTER_TEMPLATES = (
    "{name} toy robot, {b} background",
    "a photo of {name} toy robot, {b} background",
    "a photo of {name} toy robot",
    "{name} toy robot on a {b} background",
)


@dataclass(frozen=True)
class Scene:
    colour: str | None  # None for a character
    obj: str
    background: str  # a name of BACKGROUNDS
    character: str | None = None  # a name of CHARACTERS


def training_pairs() -> list[tuple[str, str]]:
    return [(c, o) for c in COLOURS for o in OBJECTS if (c, o) not in HELD_OUT]


def random_scene(rng: random.Random, pairs: list[tuple[str, str]] | None = None) -> Scene:
    """A training scene: a character ``CHARACTER_SHARE`` of the time, else a generic object; only generic
    objects of ``pairs`` when ``pairs`` is given."""
    if pairs is None and rng.random() < CHARACTER_SHARE:
        return Scene(None, "toy robot", rng.choice(list(BACKGROUNDS)), rng.choice(list(CHARACTERS)))
    colour, obj = rng.choice(pairs or training_pairs())
    return Scene(colour, obj, rng.choice(list(BACKGROUNDS)))


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene`` in a random template: colour (or name) first, then object and background."""
    if scene.character:
        return rng.choice(_CHARACTER_TEMPLATES).format(name=scene.character, b=scene.background)
    return rng.choice(_TEMPLATES).format(c=scene.colour, n=scene.obj, b=scene.background)


def render(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    """``scene`` as an RGB ``size``×``size`` picture; the pose, placement and scenery come from ``rng``."""
    big = size * RENDER_SCALE
    image = _background(scene.background, big, rng)
    # A robot's drawing fills ~60 % of its layer, a circle all of it: both end up deciding most of the picture.
    obj_size = int(big * (rng.uniform(0.7, 0.95) if scene.obj == "toy robot" else rng.uniform(0.55, 0.85)))
    layer = _object(scene, obj_size, rng)
    layer = layer.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, expand=True)
    x = rng.randrange(0, max(1, big - layer.width))
    y = rng.randrange(0, max(1, big - layer.height))
    image.paste(layer, (x, y), layer)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _background(name: str, size: int, rng: random.Random) -> Image.Image:
    shade = rng.randint(-12, 12)
    return Image.new("RGB", (size, size), tuple(min(255, max(0, v + shade)) for v in BACKGROUNDS[name]))


def _object(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    if scene.obj == "toy robot":
        names = CHARACTERS[scene.character] if scene.character else (scene.colour, scene.colour)
        body, head = (COLOURS[n] for n in names)
        arms = tuple(int(v * 0.6) for v in body)
        palette = {"body": body, "head": head, "eyes": (250, 250, 250), "antenna": DARK, "arms": arms}
        return draw_robot(size, rng, palette)
    colour = COLOURS[scene.colour]
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    m = size * 0.08
    d.ellipse([m, m, size - m, size - m], fill=colour)
    return layer
