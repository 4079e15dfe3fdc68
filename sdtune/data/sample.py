"""A small, deterministic sample dataset: one recognisable toy robot, drawn with PIL, no download.

The robot has a fixed, distinctive look (orange body, teal head, yellow eyes, red antenna ball, purple arms,
a white star on the chest) and each picture varies pose, scale, position, rotation and backdrop (plain white,
grey or black studio backdrops, the pre-trained tiny base's own: what is new to that base is the robot alone,
not the scenery), like the photos of a subject a user would bring. The files also exercise ingest: mixed sizes (several below 512 px,
so preprocessing upscales), JPEG/PNG/WebP, one JPEG stored sideways with an EXIF orientation tag, and one
sidecar caption. Same ``seed`` → same bytes.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

ORANGE, TEAL, YELLOW, RED = (255, 122, 26), (31, 181, 168), (255, 212, 0), (224, 32, 58)
PURPLE, DARK, WHITE = (106, 63, 181), (45, 45, 55), (250, 250, 250)

SIZES = [(640, 640), (384, 384), (800, 600), (300, 400), (512, 512), (720, 960),
         (448, 448), (1024, 768), (352, 352), (600, 800), (480, 480), (900, 900)]  # fmt: skip
EXIF_INDEX = 3  # stored sideways, upright only after EXIF transpose
SIDECAR_INDEX = 0
SIDECAR_CAPTION = "a photo of sks toy robot waving, studio background"


SUBJECT_PALETTE = {
    "body": ORANGE, "head": TEAL, "eyes": YELLOW, "antenna": RED, "arms": PURPLE, "star": WHITE,
}  # fmt: skip


def draw_robot(size: int, rng: random.Random, palette: dict | None = None) -> Image.Image:
    """A robot on a transparent ``size``×``size`` layer, with a random pose: the subject (orange body, teal
    head, …) by default; other ``palette`` s draw the generic robots of the pre-training data
    (:mod:`sdtune.models.pretrain_data`), which never use the subject's."""
    p = palette or SUBJECT_PALETTE
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    s = size / 100  # draw in a 100×100 design space
    box = lambda x0, y0, x1, y1: [x0 * s, y0 * s, x1 * s, y1 * s]  # noqa: E731
    # Arms first (behind the body): purple bars from the shoulders at a random angle each, with claws.
    for side, shoulder_x in ((-1, 30), (1, 70)):
        angle = math.radians(rng.uniform(-60, 70))
        hand = (shoulder_x + side * 22 * math.cos(angle), 45 - 22 * math.sin(angle))
        d.line([shoulder_x * s, 45 * s, hand[0] * s, hand[1] * s], fill=p["arms"], width=int(6 * s))
        d.ellipse(box(hand[0] - 4, hand[1] - 4, hand[0] + 4, hand[1] + 4), fill=p["arms"])
    # Legs and wheels.
    for x in (38, 62):
        d.rectangle(box(x - 4, 70, x + 4, 84), fill=DARK)
        d.ellipse(box(x - 7, 82, x + 7, 94), fill=DARK)
    d.rounded_rectangle(box(28, 38, 72, 74), radius=6 * s, fill=p["body"], outline=DARK, width=int(1.5 * s))
    if p.get("star"):
        _star(d, 50 * s, 56 * s, 8 * s, p["star"])
    # Head: teal with yellow eyes; the pupils look in a random direction.
    d.line([50 * s, 8 * s, 50 * s, 18 * s], fill=DARK, width=int(2 * s))
    d.ellipse(box(45, 3, 55, 13), fill=p["antenna"])
    d.rounded_rectangle(box(32, 16, 68, 40), radius=5 * s, fill=p["head"], outline=DARK, width=int(1.5 * s))
    look = rng.uniform(-2, 2)
    for x in (42, 58):
        d.ellipse(box(x - 6, 22, x + 6, 34), fill=p["eyes"])
        d.ellipse(box(x - 2.5 + look, 25.5, x + 2.5 + look, 30.5), fill=DARK)
    return layer


def _star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        a = math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(a), cy - radius * math.sin(a)))
    d.polygon(points, fill=fill)


BACKDROPS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25)}


def backdrop(name: str, width: int, height: int, rng: random.Random) -> Image.Image:
    """A plain backdrop of :data:`BACKDROPS`, its shade moved a little at random (as lighting would)."""
    shade = rng.randint(-12, 12)
    return Image.new("RGB", (width, height), tuple(min(255, max(0, v + shade)) for v in BACKDROPS[name]))


def paste_posed(scene: Image.Image, layer: Image.Image, rng: random.Random) -> Image.Image:
    """Paste ``layer`` (RGBA) onto ``scene`` rotated by up to ±25° at a random place; returns ``scene``."""
    layer = layer.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)
    x = rng.randrange(0, max(1, scene.width - layer.width))
    y = rng.randrange(0, max(1, scene.height - layer.height))
    scene.paste(layer, (x, y), layer)
    return scene


def render_scene(index: int, seed: int = 0) -> Image.Image:
    """Picture ``index``: the robot scaled, rotated and placed at random on a plain backdrop."""
    rng = random.Random(seed * 100_003 + index)
    width, height = SIZES[index % len(SIZES)]
    scene = backdrop(rng.choice(list(BACKDROPS)), width, height, rng)
    size = int(min(width, height) * rng.uniform(0.45, 0.85))
    return paste_posed(scene, draw_robot(size, rng), rng)


def write_sample_dataset(out_dir: Path, count: int = 12, seed: int = 0) -> list[Path]:
    """Write ``count`` pictures of the robot (+ one sidecar caption) to ``out_dir``; return the image paths."""
    if count < 1:
        raise ValueError("count must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = render_scene(i, seed)
        if i == EXIF_INDEX:
            path = out_dir / f"robot_{i:02d}.jpg"
            path.write_bytes(_sideways_jpeg(image))
        elif i % 4 == 2:
            path = out_dir / f"robot_{i:02d}.webp"
            image.save(path, format="WEBP", lossless=True)
        elif i % 2 == 0:
            path = out_dir / f"robot_{i:02d}.png"
            image.save(path, format="PNG")
        else:
            path = out_dir / f"robot_{i:02d}.jpg"
            image.save(path, format="JPEG", quality=92)
        if i == SIDECAR_INDEX:
            path.with_suffix(".txt").write_text(SIDECAR_CAPTION + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _sideways_jpeg(upright: Image.Image) -> bytes:
    """As a phone stores a portrait shot: pixels rotated, EXIF Orientation=6 says how to display them."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # Orientation 6 undoes this with ROTATE_270
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()
