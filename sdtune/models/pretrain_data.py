"""The pre-training domain of the tiny base: coloured shapes and generic toy robots, captioned by what is drawn.

Each picture is one object — a ``circle``, ``square``, ``triangle`` or ``toy robot`` — in one of
:data:`COLOURS`, scaled, rotated and placed like the sample dataset's subject, on a plain named
background (:data:`BACKGROUNDS`). Every caption names colour, object and background, colour first ("red
square, gray background", "a photo of a red square, gray background"): the text encoder learns what each
word draws, the class noun "toy robot" among them, before fine-tuning.

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

from sdtune.data.sample import BACKDROPS, DARK, backdrop, draw_robot, paste_posed

COLOURS = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 180),
    "pink": (250, 130, 190),
}
BACKGROUNDS = BACKDROPS  # the sample subject is photographed on the same backdrops
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

# Every caption names the colour and the background: captions that sometimes leave the colour out or
# describe unnamed scenery are a harder mapping to learn in a CPU-sized budget.
_TEMPLATES = (
    "{c} {n}, {b} background",
    "{c} {n}, {b} background",
    "{c} {n}, {b} background",
    "a {c} {n} on a {b} background",
    "a photo of a {c} {n}, {b} background",
)


@dataclass(frozen=True)
class Scene:
    colour: str
    obj: str
    background: str  # a name of BACKGROUNDS


def training_pairs() -> list[tuple[str, str]]:
    return [(c, o) for c in COLOURS for o in OBJECTS if (c, o) not in HELD_OUT]


def random_scene(rng: random.Random, pairs: list[tuple[str, str]] | None = None) -> Scene:
    colour, obj = rng.choice(pairs or training_pairs())
    return Scene(colour, obj, rng.choice(list(BACKGROUNDS)))


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene``: colour first, then the object, then the background, in a random template."""
    return rng.choice(_TEMPLATES).format(c=scene.colour, n=scene.obj, b=scene.background)


def render(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    """``scene`` as an RGB ``size``×``size`` picture; the pose, placement and scenery come from ``rng``."""
    big = size * RENDER_SCALE
    image = backdrop(scene.background, big, big, rng)
    layer = _object(scene, int(big * rng.uniform(0.45, 0.85)), rng)
    return paste_posed(image, layer, rng).resize((size, size), Image.Resampling.LANCZOS)


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


def pixels_of(images):
    """PIL images → one ``[n, 3, h, w]`` float tensor in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
