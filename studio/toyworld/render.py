"""Renderer of the shapes world: 64×64 scenes of 1–3 objects, each with its caption and boxes.

Every attribute that a prompt may control is written in the caption (size, texture, colour, shape,
position, background): a model only learns to control what its captions say.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4× and downsampled, for anti-aliased edges

BASE_SHAPES = ("circle", "square", "triangle", "star", "heart")
# Shapes the base model never sees; the example concept LoRAs teach them.
NOVEL_SHAPES = ("crescent", "cross")
SHAPES = BASE_SHAPES + NOVEL_SHAPES

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
_LUMINANCE = {name: 0.299 * r + 0.587 * g + 0.114 * b for name, (r, g, b) in COLOURS.items()}

BASE_TEXTURES = ("solid", "striped", "dotted")
# Textures the base model never sees; the example style LoRAs teach them.
NOVEL_TEXTURES = ("checkered", "ringed")
TEXTURES = BASE_TEXTURES + NOVEL_TEXTURES
TEXTURE_WORDS = {"solid": "solid", "striped": "striped", "dotted": "dotted",
                 "checkered": "checkered", "ringed": "ringed"}

# Palettes the base model never sees; style LoRAs teach them. A palette redraws every colour as a tone of its own
# ramp, darkest to lightest in the order of the colours' luminance (a duotone, as a sepia print redraws a photo),
# so the named colour still sets how light the object is. The judge has one colour class per palette.
PALETTES = {"sepia": ((92, 52, 22), (200, 146, 86)), "cyanotype": ((14, 60, 104), (104, 174, 206))}
NOVEL_PALETTES = tuple(PALETTES)
STYLES = TEXTURES + NOVEL_PALETTES  # what a style teaches, and what an object may wear

BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15)}
SIZES = {"small": (5.5, 7.5), "large": (8.5, 10.5)}  # object radius in pixels at 64×64

# Colour–shape pairs never shown to the base model: the quality bar measures generalisation on them.
HELD_OUT_PAIRS = frozenset({("red", "star"), ("blue", "heart"), ("green", "triangle"),
                            ("yellow", "circle"), ("purple", "square"), ("orange", "star")})

SLOTS = ("left", "centre", "right")
SLOT_X = {"left": 0.18, "centre": 0.5, "right": 0.82}
SLOT_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


@dataclass
class ShapeObject:
    shape: str
    colour: str
    texture: str
    size: str
    cx: float  # centre, relative coordinates in [0, 1]
    cy: float
    radius: float  # pixels at 64×64
    angle: float = 0.0  # degrees, small jitter
    palette: str = ""  # "" (the colours as named) or one of PALETTES

    @property
    def rgb(self) -> np.ndarray:
        """The colour the object is drawn in: its named colour, or that colour's tone in its palette."""
        base = np.asarray(COLOURS[self.colour], np.float32)
        if not self.palette:
            return base
        dark, light = (np.asarray(c, np.float32) for c in PALETTES[self.palette])
        low, high = min(_LUMINANCE.values()), max(_LUMINANCE.values())
        return dark + (light - dark) * (_LUMINANCE[self.colour] - low) / (high - low)

    def wear(self, style: str) -> None:
        """Draw the object in a style: a palette (over the texture it has) or a texture."""
        if style in PALETTES:
            self.palette = style
        else:
            self.texture = style

    @property
    def judged_colour(self) -> str:
        """The judge's colour class for the object: its palette when it has one."""
        return self.palette or self.colour

    @property
    def slot(self) -> str:
        return min(SLOTS, key=lambda s: abs(SLOT_X[s] - self.cx))

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Ground-truth box (x0, y0, x1, y1) in relative coordinates."""
        r = self.radius / IMAGE_SIZE
        return (max(0.0, self.cx - r), max(0.0, self.cy - r), min(1.0, self.cx + r), min(1.0, self.cy + r))


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str
    triggers: dict[str, str] = field(default_factory=dict)  # shape or texture name -> trigger word
    # A style trigger learnt as a word of its own (--embedding) stands where texture words stand, before the colour.
    learnt_triggers: bool = False
    # ... or, with this, every style trigger stands right after its object's noun (--trigger-after-noun).
    trigger_after_noun: bool = False

    def phrases(self) -> list[tuple[ShapeObject, str]]:
        """Each object with the phrase that names it, in caption order (left to right). Style words (palette,
        then texture) stand before the colour, the grammar the base model learnt its textures from; a style
        trigger goes after the colour unless it was learnt as a word of its own (`learnt_triggers`): the text
        encoder is causal, so a word it never saw placed before the colour changes how the colour is read
        (colours right 9 → 28 of 32). With `trigger_after_noun` a style trigger follows the noun instead, so that
        every word up to the noun reads as it does without the style: a content LoRA's shape word, for one."""
        out = []
        for obj in sorted(self.objects, key=lambda o: o.cx):
            noun = self.triggers.get(obj.shape, obj.shape)
            before, after, trailing = [], [], []
            for style, default in ((obj.palette, obj.palette), (obj.texture, TEXTURE_WORDS[obj.texture])):
                if style in self.triggers:
                    if self.trigger_after_noun:
                        trailing.append(self.triggers[style])
                    else:
                        (before if self.learnt_triggers else after).append(self.triggers[style])
                elif style:
                    before.append(default)
            words = " ".join(before + [obj.colour] + after)
            out.append((obj, " ".join(["a", obj.size, words, noun] + trailing + [SLOT_PHRASE[obj.slot]])))
        return out

    def caption(self) -> str:
        parts = [phrase for _, phrase in self.phrases()]
        if len(parts) == 1:
            objects = parts[0]
        else:
            objects = ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{objects}, {self.background} background"

    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    rot = math.radians(angle)

    def rotate(points):
        return [(cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot))
                for x, y in points]

    if shape == "square":
        s = r * 0.85
        return rotate([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rotate([(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return rotate(pts)
    if shape == "heart":
        pts = []
        for k in range(60):
            t = 2 * math.pi * k / 60
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17.0, (y + 2.5) * r / 17.0))
        return rotate(pts)
    if shape == "cross":
        a, b = r, r * 0.36
        return rotate([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                       (-a, -b), (-b, -b)])
    return None


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size) -> Image.Image:
    """Binary mask (mode L) of one shape on a canvas of `size` (int or (w, h)); coordinates in its pixels."""
    mask = Image.new("L", (size, size) if isinstance(size, int) else tuple(size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = r * 0.55
        rot = math.radians(angle)
        ox, oy = cx + off * math.cos(rot), cy + off * math.sin(rot) - r * 0.1
        draw.ellipse([ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def texture_pattern(texture: str, xx: np.ndarray, yy: np.ndarray, rng: random.Random, cx: float, cy: float) -> np.ndarray:
    """Float map in [0, 1] over pixel coordinates (xx, yy) of the 64×64 image: 1 where the object's
    colour shows, 0 where its lighter tint does."""
    if texture == "solid":
        return np.ones(xx.shape, np.float32)
    if texture == "striped":
        period = 4.0
        phase = rng.uniform(0, period)
        return (((xx + yy + phase) % period) < period / 2).astype(np.float32)
    if texture == "dotted":
        period = 4.0
        px, py = rng.uniform(0, period), rng.uniform(0, period)
        dx = (xx + px) % period - period / 2
        dy = (yy + py) % period - period / 2
        return ((dx * dx + dy * dy) > 1.0).astype(np.float32)
    if texture == "checkered":
        period = 6.0
        px, py = rng.uniform(0, period), rng.uniform(0, period)
        return ((((xx + px) // (period / 2)) + ((yy + py) // (period / 2))) % 2 == 0).astype(np.float32)
    if texture == "ringed":
        period = 4.0
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        return ((d % period) < period / 2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """Render a scene to a 64×64 RGB image (drawn at 4× and box-filtered down)."""
    rng = random.Random(seed)
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cx, cy, r = obj.cx * big, obj.cy * big, obj.radius * SUPERSAMPLE
        x0, y0 = max(0, int(cx - r) - 4), max(0, int(cy - r) - 4)
        x1, y1 = min(big, int(cx + r) + 5), min(big, int(cy + r) + 5)
        window = shape_mask(obj.shape, cx - x0, cy - y0, r, obj.angle, (x1 - x0, y1 - y0))
        alpha = np.asarray(window, np.float32)[..., None] / 255.0
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) / SUPERSAMPLE
        pattern = texture_pattern(obj.texture, xx, yy, rng, obj.cx * IMAGE_SIZE, obj.cy * IMAGE_SIZE)[..., None]
        base = obj.rgb
        light = base * 0.35 + 255 * 0.65
        fill = pattern * base + (1 - pattern) * light
        canvas[y0:y1, x0:x1] = alpha * fill + (1 - alpha) * canvas[y0:y1, x0:x1]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def random_object(rng: random.Random, shapes=BASE_SHAPES, textures=BASE_TEXTURES, slot: str | None = None,
                  allow_held_out: bool = False) -> ShapeObject:
    while True:
        shape, colour = rng.choice(shapes), rng.choice(COLOUR_NAMES)
        if allow_held_out or (colour, shape) not in HELD_OUT_PAIRS:
            break
    size = rng.choice(tuple(SIZES))
    radius = rng.uniform(*SIZES[size])
    slot = slot or rng.choice(SLOTS)
    cx = SLOT_X[slot] + rng.uniform(-0.04, 0.04)
    cy = 0.5 + rng.uniform(-0.2, 0.2)
    return ShapeObject(shape, colour, rng.choice(textures), size, cx, cy, radius, rng.uniform(-12, 12))


def random_scene(rng: random.Random, n_objects: int | None = None, shapes=BASE_SHAPES, textures=BASE_TEXTURES,
                 allow_held_out: bool = False, palettes=()) -> Scene:
    """A random scene; with `palettes`, each object is drawn in one of them or in its own colours, equally likely
    (drawn only when given, so the scenes without palettes stay the same stream)."""
    n = n_objects or rng.choice((1, 1, 2, 2, 3))
    slots = rng.sample(SLOTS, n)
    while True:  # objects never overlap: the judge and the captions describe separate things
        objects = [random_object(rng, shapes, textures, slot, allow_held_out) for slot in slots]
        if all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    for obj in objects if palettes else ():
        obj.palette = rng.choice(("",) + tuple(palettes))
    return Scene(objects, rng.choice(tuple(BACKGROUNDS)))


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    distance = math.hypot((a.cx - b.cx) * IMAGE_SIZE, (a.cy - b.cy) * IMAGE_SIZE)
    return distance >= a.radius + b.radius + 1.5


def image_to_tensor_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 image -> CHW float32 in [-1, 1]."""
    return (np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur / noise / colour jitter: what a generator's output looks like next to a clean render."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    arr = np.asarray(image, np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.uniform(-20, 20) + np.asarray([rng.uniform(-12, 12) for _ in range(3)])
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 10), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
