"""The judge: a small CNN that tells, for a region of a shapes-world image, the shape, colour and texture
of the object there (or "nothing"). Benchmarks and tests score generated images with it."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from studio.toyworld.render import (COLOUR_NAMES, IMAGE_SIZE, NOVEL_PALETTES, SHAPES, SLOT_X, TEXTURES, degrade,
                                    image_to_tensor_array, random_scene, render)

NOTHING = "nothing"
SHAPE_CLASSES = (NOTHING,) + SHAPES
COLOUR_CLASSES = (NOTHING,) + COLOUR_NAMES + NOVEL_PALETTES  # an object in a palette is judged as the palette
TEXTURE_CLASSES = (NOTHING,) + TEXTURES
CROP = 32
PALETTE_SHARE = 0.25


class JudgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape = nn.Linear(96, len(SHAPE_CLASSES))
        self.colour = nn.Linear(96, len(COLOUR_CLASSES))
        self.texture = nn.Linear(96, len(TEXTURE_CLASSES))

    def forward(self, x):
        h = self.features(x)
        return self.shape(h), self.colour(h), self.texture(h)


@dataclass
class Verdict:
    shape: str
    colour: str
    texture: str
    confidence: float

    def matches(self, shape: str | None = None, colour: str | None = None, texture: str | None = None) -> bool:
        return ((shape is None or self.shape == shape) and (colour is None or self.colour == colour)
                and (texture is None or self.texture == texture))


def square_crop(image: Image.Image, box, scale: float = 1.3) -> np.ndarray:
    """Square crop around a relative box, side = scale × its longer edge, resized to CROP×CROP; CHW in [-1, 1]."""
    x0, y0, x1, y1 = (v * IMAGE_SIZE for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0, 4.0) * scale / 2
    crop = image.convert("RGB").crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return image_to_tensor_array(crop.resize((CROP, CROP), Image.Resampling.BILINEAR))


def background_colour(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return np.median(border, axis=0)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a small boolean image (0 = background)."""
    labels = np.zeros(mask.shape, np.int32)
    current = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        current += 1
        stack = [(y, x)]
        labels[y, x] = current
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
    return labels


def locate(image: Image.Image, region, min_pixels: int = 6, threshold: float = 60.0):
    """Box (relative) of the object that has most of its pixels inside `region` (relative x0, y0, x1, y1),
    or None. Objects are connected foreground pixels, dilated by one pixel so that a striped or dotted
    object stays one piece."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    foreground = np.linalg.norm(arr - background_colour(image), axis=-1) > threshold
    grown = foreground.copy()
    grown[1:] |= foreground[:-1]
    grown[:-1] |= foreground[1:]
    grown[:, 1:] |= foreground[:, :-1]
    grown[:, :-1] |= foreground[:, 1:]
    labels = _components(grown) * foreground
    x0, y0, x1, y1 = (int(round(v * IMAGE_SIZE)) for v in region)
    counts = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=labels.max() + 1)
    counts[0] = 0
    if counts.max(initial=0) < min_pixels:
        return None
    ys, xs = np.nonzero(labels == counts.argmax())
    return (xs.min() / IMAGE_SIZE, ys.min() / IMAGE_SIZE, (xs.max() + 1) / IMAGE_SIZE, (ys.max() + 1) / IMAGE_SIZE)


def slot_region(slot: str, half_width: float = 0.16):
    return (max(0.0, SLOT_X[slot] - half_width), 0.0, min(1.0, SLOT_X[slot] + half_width), 1.0)


class Judge:
    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: Path | None = None) -> "Judge":
        from safetensors.torch import load_file

        from studio import paths

        net = JudgeNet()
        net.load_state_dict(load_file(str(path or paths.JUDGE)))
        return cls(net)

    @torch.no_grad()
    def classify(self, image: Image.Image, boxes) -> list[Verdict]:
        """Verdicts for regions given as relative boxes; a region with no foreground is "nothing"."""
        located = [locate(image, box) for box in boxes]
        crops = [square_crop(image, b) for b in located if b is not None]
        verdicts = iter(self._predict(np.stack(crops)) if crops else [])
        return [next(verdicts) if b is not None else Verdict(NOTHING, NOTHING, NOTHING, 1.0) for b in located]

    def _predict(self, crops: np.ndarray) -> list[Verdict]:
        s, c, t = self.net(torch.from_numpy(crops))
        ps, pc, pt = s.softmax(-1), c.softmax(-1), t.softmax(-1)
        out = []
        for i in range(len(crops)):
            conf = float(ps[i].max() * pc[i].max())
            out.append(Verdict(SHAPE_CLASSES[int(ps[i].argmax())], COLOUR_CLASSES[int(pc[i].argmax())],
                               TEXTURE_CLASSES[int(pt[i].argmax())], conf))
        return out

    def slots(self, image: Image.Image) -> dict[str, Verdict]:
        """Verdict for each of the three horizontal slots (left, centre, right)."""
        names = tuple(SLOT_X)
        return dict(zip(names, self.classify(image, [slot_region(s) for s in names])))


def _training_examples(rng: random.Random):
    """One degraded render and, for each object in it and for one empty region, a jittered crop and its labels.
    A quarter of the objects wear one of the palettes (their colour class is the palette's), so that each palette
    is about as frequent as each colour."""
    scene = random_scene(rng, shapes=SHAPES, textures=TEXTURES, allow_held_out=True)
    for obj in scene.objects:
        if rng.random() < PALETTE_SHARE:
            obj.palette = rng.choice(NOVEL_PALETTES)
    image = degrade(render(scene, rng.randrange(1 << 30)), rng)
    examples = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        jitter = (x1 - x0) * 0.12
        box = (x0 + rng.uniform(-jitter, jitter), y0 + rng.uniform(-jitter, jitter),
               x1 + rng.uniform(-jitter, jitter), y1 + rng.uniform(-jitter, jitter))
        examples.append((square_crop(image, box, scale=rng.uniform(1.1, 1.7)),
                         (SHAPE_CLASSES.index(obj.shape), COLOUR_CLASSES.index(obj.judged_colour),
                          TEXTURE_CLASSES.index(obj.texture))))
    free = [s for s in SLOT_X if s not in {o.slot for o in scene.objects}]
    if free:
        cx, cy, side = SLOT_X[rng.choice(free)] + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        examples.append((square_crop(image, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), scale=1.0),
                         (0, 0, 0)))
    return examples


def _batch(rng: random.Random, n: int):
    examples = []
    while len(examples) < n:
        examples.extend(_training_examples(rng))
    crops, labels = zip(*examples[:n])
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels)


def _accuracy(logits, labels) -> dict:
    s, c, t = (logit.argmax(-1) for logit in logits)
    acc = {name: float((pred == labels[:, i]).float().mean()) for i, (name, pred) in
           enumerate((("shape", s), ("colour", c), ("texture", t)))}
    acc["all_three"] = float(((s == labels[:, 0]) & (c == labels[:, 1]) & (t == labels[:, 2])).float().mean())
    acc["n"] = len(labels)
    return acc


def evaluate(judge_net: JudgeNet, seed: int = 12345, n: int = 2000) -> dict:
    """Accuracy on fresh degraded renders (a seed the training never draws); also on the objects in a palette
    alone (`"palette_objects"`)."""
    judge_net.eval()
    x, y = _batch(random.Random(seed), n)
    with torch.no_grad():
        logits = judge_net(x)
    report = _accuracy(logits, y)
    in_palette = y[:, 1] >= COLOUR_CLASSES.index(NOVEL_PALETTES[0])
    report["palette_objects"] = _accuracy([logit[in_palette] for logit in logits], y[in_palette])
    return report


def train_judge(out_path: Path, steps: int = 3000, batch_size: int = 128, seed: int = 0, progress: bool = True) -> dict:
    from safetensors.torch import save_file

    from studio.errors import StudioError

    if steps < 1 or batch_size < 1:
        raise StudioError(f"The judge needs at least one step of at least one image, not {steps} steps of {batch_size}.")
    if not Path(out_path).parent.is_dir() or Path(out_path).is_dir():
        raise StudioError(f"Cannot write the judge to {out_path}: give a file path in an existing folder.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for _ in bar:
        net.train()
        x, y = _batch(rng, batch_size)
        s, c, t = net(x)
        loss = F.cross_entropy(s, y[:, 0]) + F.cross_entropy(c, y[:, 1]) + F.cross_entropy(t, y[:, 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    report = evaluate(net)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_path))
    out_path.with_suffix(".json").write_text(json.dumps({"held_out_accuracy": report, "steps": steps,
                                                          "batch_size": batch_size, "seed": seed}, indent=1))
    return report
