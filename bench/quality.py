"""Composition quality on the bundled shapes-world model: fixed, seeded suites of compositions, every image scored
per region by the judge, every method side by side.

Suites (each case draws colours, sides, sizes and backgrounds from its seed):
- distinct: two concept LoRAs with their own trigger words (crescent `sks`, cross `ohwx`), each in its own box;
- entangled: two concept LoRAs bound to the same ordinary word (`shape`: one teaches the crescent, one the cross),
  the case of two character LoRAs both bound to "woman";
- three: three concepts in three boxes (crescent `sks`, cross `ohwx`, heart `hrtz`);
- style: a concept in a box plus a style LoRA (the sepia palette), with a plain object elsewhere; every method with
  and without DECOR;
- layouts: boxes much larger than the object, small objects, tall and wide boxes, boxes touching the border,
  non-square images (distinct's LoRAs).

Per method and suite: all concepts right (shape and colour in its box), with its 95 % Wilson interval; objects
vanished; confused (another concept's shape in a region); style applied and leakage (style suite); shape fidelity
(the judge's shape accuracy in the concepts' boxes composed, against each LoRA alone in the same box); seconds per
image. Seeds: `--split test` (default, the figures reported) or `--split dev` (another set, to tune on).

Usage: studio bench quality [--suite NAME ...] [--methods M ...] [--n N] [--split test|dev] [--quick] [--out DIR]
Writes DIR/quality.json, DIR/quality.md and DIR/quality/<suite>-<method>.png (contact sheets); DIR defaults to
bench/results.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
LORAS = ROOT / "assets" / "loras"
SUITES = ("distinct", "entangled", "three", "style", "layouts")
BOX_METHODS = ("merge", "regional", "latent_couple", "lora_composer", "clora", "composite", "switch", "k_lora")
SPLIT_SEED = {"test": 0, "dev": 100_000}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "grey", "black")
STEPS, GUIDANCE = 20, 5.0
OVERRIDES: dict[str, dict] = {}  # method -> parameters set for a run (--set)
REFERENCE_ROW = "each LoRA alone (reference)"


@dataclass
class Concept:
    file: str  # under assets/loras
    shape: str  # what it draws
    trigger: str


DISTINCT = (Concept("crescent-sks.safetensors", "crescent", "sks"), Concept("cross-ohwx.safetensors", "cross", "ohwx"))
ENTANGLED = (Concept("crescent-shape.safetensors", "crescent", "shape"),
             Concept("cross-shape.safetensors", "cross", "shape"))
THIRD = Concept("heart-hrtz.safetensors", "heart", "hrtz")
STYLE = ("sepia-sepx.safetensors", "sepia", "sepx")


@dataclass
class Expected:
    box: tuple[float, float, float, float]  # where the judge looks (relative x0, y0, x1, y1)
    shape: str
    colour: str  # the judge's colour class: the named colour, or the palette
    concept: int | None  # index into the case's concepts; None: a plain object no LoRA draws


@dataclass
class Case:
    suite: str
    seed: int
    prompt: str
    concepts: list[Concept]
    boxes: list[tuple[float, float, float, float]]  # each concept's box
    phrases: list[str]  # each concept's phrase in the prompt
    background: str
    expected: list[Expected]
    width: int = 64
    height: int = 64
    style: tuple[str, str, str] | None = None
    plain_phrase: str | None = None
    alone_phrases: list[str] | None = None  # each concept's phrase for its LoRA alone (default: `phrases`)
    meta: dict = field(default_factory=dict)


# --- the suites ---------------------------------------------------------------------------------------------
def _phrase(size: str, colour: str, noun: str, where: str, palette_word: str | None = None) -> str:
    """The training captions' grammar: "a large solid red sks on the left"; a learnt palette word stands where the
    texture word stands, before the colour."""
    words = ["a", size] + ([palette_word] if palette_word else []) + ["solid", colour, noun, where]
    return " ".join(words)


def _join(phrases: list[str], background: str) -> str:
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body}, {background} background"


SLOT_BOXES = {"left": (0.0, 0.18, 0.34, 0.82), "centre": (0.34, 0.18, 0.66, 0.82), "right": (0.66, 0.18, 1.0, 0.82)}
WHERE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


def slot_case(suite: str, seed: int, concepts, n_slots: int | None = None) -> Case:
    rng = random.Random(f"{suite}-{seed}")
    slots = sorted(rng.sample(("left", "centre", "right"), n_slots or len(concepts)),
                   key=("left", "centre", "right").index)
    order = list(concepts)
    rng.shuffle(order)
    background = rng.choice(BACKGROUNDS)
    colours = rng.sample([c for c in COLOURS if not (background == "white" and c == "yellow")], len(order))
    sizes = [rng.choice(("small", "large")) for _ in order]
    phrases = [_phrase(size, colour, c.trigger, WHERE[slot]) for c, size, colour, slot in zip(order, sizes, colours, slots)]
    boxes = [SLOT_BOXES[s] for s in slots]
    expected = [Expected(box, c.shape, colour, i) for i, (c, box, colour) in enumerate(zip(order, boxes, colours))]
    return Case(suite, seed, _join(phrases, background), order, boxes, phrases, background, expected,
                meta={"sizes": sizes})


def style_case(seed: int) -> Case:
    rng = random.Random(f"style-{seed}")
    concept = DISTINCT[rng.randrange(2)]
    concept_slot, plain_slot = rng.sample(("left", "right"), 2)
    background = rng.choice(BACKGROUNDS)
    colour, plain_colour = rng.sample(COLOURS, 2)
    plain_shape = rng.choice(("circle", "square", "triangle", "star", "heart"))
    size, plain_size = rng.choice(("small", "large")), rng.choice(("small", "large"))
    style_file, palette, word = STYLE
    phrase = _phrase(size, colour, concept.trigger, WHERE[concept_slot], word)
    plain = _phrase(plain_size, plain_colour, plain_shape, WHERE[plain_slot], word)
    ordered = [phrase, plain] if concept_slot == "left" else [plain, phrase]
    expected = [Expected(SLOT_BOXES[concept_slot], concept.shape, palette, 0),
                Expected(SLOT_BOXES[plain_slot], plain_shape, palette, None)]
    return Case("style", seed, _join(ordered, background), [concept], [SLOT_BOXES[concept_slot]], [phrase], background,
                expected, style=STYLE, plain_phrase=plain,
                alone_phrases=[_phrase(size, colour, concept.trigger, WHERE[concept_slot])])


LAYOUTS = ("large_box", "small_objects", "tall_boxes", "wide_boxes", "border_boxes", "wide_image", "tall_image")


def layout_case(seed: int) -> Case:
    """Two distinct concepts, in a layout unlike the slots the model learnt from: boxes much larger than the object,
    small objects, tall and wide boxes, boxes touching the border, non-square images."""
    kind = LAYOUTS[seed % len(LAYOUTS)]
    case = slot_case("layouts", seed, DISTINCT, 2)
    left, right = ("left", "right") if case.boxes[0][0] < case.boxes[1][0] else ("right", "left")
    boxes = {"large_box": {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)},
             "small_objects": {"left": (0.05, 0.3, 0.35, 0.7), "right": (0.65, 0.3, 0.95, 0.7)},
             "tall_boxes": {"left": (0.08, 0.0, 0.3, 1.0), "right": (0.7, 0.0, 0.92, 1.0)},
             "wide_boxes": {"left": (0.0, 0.3, 0.48, 0.7), "right": (0.52, 0.3, 1.0, 0.7)},
             "border_boxes": {"left": (0.0, 0.1, 0.3, 0.9), "right": (0.7, 0.1, 1.0, 0.9)},
             "wide_image": {"left": (0.0, 0.15, 0.4, 0.85), "right": (0.6, 0.15, 1.0, 0.85)},
             "tall_image": {"left": (0.0, 0.25, 0.5, 0.75), "right": (0.5, 0.25, 1.0, 0.75)}}[kind]
    sides = [left, right]
    case.boxes = [boxes[s] for s in sides]
    sizes = ["small"] * 2 if kind == "small_objects" else case.meta["sizes"]
    colours = [e.colour for e in case.expected]
    case.phrases = [_phrase(size, colour, c.trigger, WHERE[s]) for c, size, colour, s in
                    zip(case.concepts, sizes, colours, sides)]
    order = sorted(range(2), key=lambda i: case.boxes[i][0])
    case.prompt = _join([case.phrases[i] for i in order], case.background)
    case.expected = [Expected(box, e.shape, e.colour, e.concept) for box, e in zip(case.boxes, case.expected)]
    case.width, case.height = {"wide_image": (96, 64), "tall_image": (64, 96)}.get(kind, (64, 64))
    case.meta = {"layout": kind}
    return case


def suite_cases(suite: str, n: int, split: str) -> list[Case]:
    seeds = range(SPLIT_SEED[split], SPLIT_SEED[split] + n)
    if suite == "distinct":
        return [slot_case(suite, s, DISTINCT, 2) for s in seeds]
    if suite == "entangled":
        return [slot_case(suite, s, ENTANGLED, 2) for s in seeds]
    if suite == "three":
        return [slot_case(suite, s, DISTINCT + (THIRD,)) for s in seeds]
    if suite == "style":
        return [style_case(s) for s in seeds]
    if suite == "layouts":
        return [layout_case(s) for s in seeds]
    raise SystemExit(f"error: unknown suite {suite!r}; choose from {', '.join(SUITES)}.")


# --- compositions --------------------------------------------------------------------------------------------
def composition_for(case: Case, method: str, decor: bool = False, auto: bool = False, params: dict | None = None):
    """The case as a composition for `method`: boxes and region prompts for the box methods (`auto`: no boxes, the
    regional method places each concept from its trigger's attention); for CLoRA (no boxes) the prompt of each
    concept is the whole scene with only its own trigger, the others named by the word `shape`, as the official
    samples give each LoRA its own prompt."""
    from studio.spec import Composition, LoraEntry, Region

    entries = []
    for concept, box, phrase in zip(case.concepts, case.boxes, case.phrases):
        entries.append(LoraEntry(file=str(LORAS / concept.file), role="concept", trigger_words=[concept.trigger],
                                 region=Region(auto=True) if auto else Region(box=box),
                                 prompt=_join([phrase], case.background)))
    params: dict = {**OVERRIDES.get(method, {}), **(params or {})}
    prompt = case.prompt
    if method == "clora":
        params["subjects"] = ["shape"] * len(case.concepts)
        for k, entry in enumerate(entries):
            others = [c.trigger for j, c in enumerate(case.concepts) if j != k]
            entry.prompt = _replace_words(case.prompt, {t: "shape" for t in others if t != case.concepts[k].trigger})
        prompt = _replace_words(case.prompt, {c.trigger: "shape" for c in case.concepts})
    if case.style is not None:
        style_file, _, word = case.style
        entries.append(LoraEntry(file=str(LORAS / style_file), role="style", trigger_words=[word],
                                 decor=[c.trigger for c in case.concepts] if decor else []))
    return Composition(prompt=prompt, steps=STEPS, guidance=GUIDANCE, seed=case.seed, method=method, loras=entries,
                       params=params, width=case.width, height=case.height)


def _replace_words(text: str, mapping: dict[str, str]) -> str:
    return " ".join(mapping.get(word.rstrip(","), word.rstrip(",")) + ("," if word.endswith(",") else "")
                    for word in text.split())


def alone_composition(case: Case, k: int):
    """Concept k's LoRA alone (merge, one LoRA) with its own phrase, in the case's size and seed: the reference of
    shape fidelity."""
    from studio.spec import Composition, LoraEntry

    concept = case.concepts[k]
    return Composition(prompt=_join([(case.alone_phrases or case.phrases)[k]], case.background), steps=STEPS, guidance=GUIDANCE,
                       seed=case.seed, method="merge", width=case.width, height=case.height,
                       loras=[LoraEntry(file=str(LORAS / concept.file), role="concept", trigger_words=[concept.trigger])])


# --- scoring ----------------------------------------------------------------------------------------------------
def score(judge, image: Image.Image, case: Case) -> dict:
    """Per region: right (shape and colour), vanished, confused; for the style suite, style applied and leakage."""
    verdicts = judge_regions(judge, image, [e.box for e in case.expected])
    return case_score([region_score(verdict, expected, case) for expected, verdict in zip(case.expected, verdicts)],
                      case)


def region_score(verdict, expected: Expected, case: Case) -> dict:
    """One region's verdict against what was asked there (in a composed image, or in the image of its LoRA alone)."""
    from studio.toyworld.judge import NOTHING

    concept_shapes = {c.shape for c in case.concepts}
    return {"right": verdict.shape == expected.shape and verdict.colour == expected.colour,
            "shape_right": verdict.shape == expected.shape,
            "vanished": verdict.shape == NOTHING,
            "confused": verdict.shape in concept_shapes - {expected.shape},
            "concept": expected.concept is not None,
            "styled": case.style is not None and verdict.colour == case.style[1],
            "leak": expected.concept is None and verdict.shape in concept_shapes,
            "verdict": [verdict.shape, verdict.colour, verdict.texture]}


def case_score(regions: list[dict], case: Case) -> dict:
    concept_regions = [r for r in regions if r["concept"]]
    return {"all_right": all(r["right"] for r in regions), "regions": regions,
            "vanished": sum(r["vanished"] for r in concept_regions),
            "confused": sum(r["confused"] for r in concept_regions),
            "shape_right": sum(r["shape_right"] for r in concept_regions), "concepts": len(concept_regions),
            "style_applied": all(r["styled"] for r in regions) if case.style else None,
            "leakage": any(r["leak"] for r in regions) if case.style else None}


def judge_regions(judge, image: Image.Image, boxes):
    """The judge reads 64-pixel images; a larger or non-square image is read through a 64×64 view of it."""
    from studio.toyworld.render import IMAGE_SIZE

    if image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return judge.classify(image, boxes)
    return judge.classify(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), boxes)


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95 % Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def summarise(scores: list[dict], seconds: list[float], alone_shape: tuple[int, int]) -> dict:
    n = len(scores)
    right = sum(s["all_right"] for s in scores)
    shape_right = sum(s["shape_right"] for s in scores)
    concepts = sum(s["concepts"] for s in scores)
    row = {"all_right": round(right / n, 4), "ci": wilson(right, n), "n": n,
           "vanished": sum(s["vanished"] for s in scores), "confused": sum(s["confused"] for s in scores),
           "concept_regions": concepts, "shape_accuracy": round(shape_right / concepts, 4),
           "shape_accuracy_alone": round(alone_shape[0] / alone_shape[1], 4) if alone_shape[1] else None,
           "seconds_per_image": round(sorted(seconds)[len(seconds) // 2], 3)}
    row["shape_fidelity_points"] = (round(100 * (row["shape_accuracy"] - row["shape_accuracy_alone"]), 1)
                                    if row["shape_accuracy_alone"] is not None else None)
    if scores[0]["style_applied"] is not None:
        applied = sum(s["style_applied"] for s in scores)
        leaks = sum(s["leakage"] for s in scores)
        row.update({"style_applied": round(applied / n, 4), "style_applied_ci": wilson(applied, n),
                    "leakage": round(leaks / n, 4), "leakage_ci": wilson(leaks, n)})
    return row


# --- running -------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self):
        from studio.models import load_base_model
        from studio.toyworld.judge import Judge

        self.pipe = load_base_model()
        self.judge = Judge.load()
        self._weights: dict[str, object] = {}

    def loaded(self, composition):
        from studio.compose import adapter_name
        from studio.lora import load_lora

        out = {}
        for i, entry in enumerate(composition.loras):
            if entry.file not in self._weights:
                self._weights[entry.file] = load_lora(Path(entry.file))
            out[adapter_name(i, entry.file)] = (entry, self._weights[entry.file])
        return out

    def generate(self, composition):
        from studio.compose import compose

        start = time.perf_counter()
        result = compose(self.pipe, composition, loaded=self.loaded(composition))
        return result.image, time.perf_counter() - start


def method_variants(suite: str, methods: list[str]) -> list[tuple[str, str, dict]]:
    """(row name, method, options) for a suite: the style suite runs every method with and without DECOR; the two-
    concept suites also run regional with regions placed automatically (no boxes)."""
    rows = []
    for method in methods:
        if method == "k_lora" and suite != "style":
            continue  # one content and one style LoRA only
        rows.append((method, method, {}))
        if suite == "style":
            rows.append((f"{method}+decor", method, {"decor": True}))
        if method == "regional" and suite in ("distinct", "entangled"):
            rows.append(("regional (auto regions)", method, {"auto": True}))
        if method in ("switch", "composite") and suite in ("distinct", "entangled"):
            rows.append((f"{method} (official encoding)", method, {"params": {"text_encoding": "official"}}))
    return rows


def contact_sheet(images: list[Image.Image], cases: list[Case], scores: list[dict], path: Path, scale: int = 2):
    """Every image of a method on a suite, upscaled (nearest), its boxes drawn green where the judge found what
    was asked and red where it did not."""
    cell = 96 * scale
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, (image, case, result) in enumerate(zip(images, cases, scores)):
        w, h = image.size
        factor = cell / max(w, h)
        big = image.resize((round(w * factor), round(h * factor)), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(big)
        for expected, region in zip(case.expected, result["regions"]):
            x0, y0, x1, y1 = expected.box
            draw.rectangle([x0 * big.width, y0 * big.height, x1 * big.width - 1, y1 * big.height - 1],
                           outline=(0, 200, 0) if region["right"] else (230, 0, 0), width=max(1, scale))
        sheet.paste(big, ((i % cols) * cell, (i // cols) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run(suites: list[str], methods: list[str], n: int, split: str, out: Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    runner = Runner()
    report = {"split": split, "first_seed": SPLIT_SEED[split], "steps": STEPS, "guidance": GUIDANCE,
              "overrides": OVERRIDES, "command": None, "suites": {}}
    for suite in suites:
        cases = suite_cases(suite, n, split)
        missing = sorted({c.file for case in cases for c in case.concepts if not (LORAS / c.file).exists()})
        if missing:
            report["suites"][suite] = {"skipped": f"{missing[0]} is not in assets/loras"}
            continue
        alone = [0, 0]  # each concept's LoRA alone: shapes right in its box, boxes
        reference = {"scores": [], "seconds": [], "images": [], "cases": [], "regions": []}
        for case in tqdm(cases, desc=f"{suite}: each LoRA alone", disable=not progress, leave=False):
            regions, seconds = [], 0.0
            for k, concept in enumerate(case.concepts):
                image, elapsed = runner.generate(alone_composition(case, k))
                verdict = judge_regions(runner.judge, image, [case.boxes[k]])[0]
                alone[0] += verdict.shape == concept.shape
                alone[1] += 1
                regions.append(region_score(verdict, case.expected[k], case))
                seconds += elapsed
                reference["images"].append(image)
                reference["cases"].append(Case(**{**vars(case), "expected": [case.expected[k]]}))
                reference["regions"].append({"regions": [regions[-1]]})
            reference["scores"].append(case_score(regions, case))
            reference["seconds"].append(seconds)
        report["suites"][suite] = {}
        if cases[0].style is None:  # the ceiling of a composition: every concept right when each LoRA draws it alone
            row = summarise(reference["scores"], reference["seconds"], tuple(alone))
            row["method"], row["options"] = "merge", {"each LoRA alone": True}
            row["contact_sheet"] = f"quality/{suite}-each-LoRA-alone.png"
            contact_sheet(reference["images"], reference["cases"], reference["regions"], out / row["contact_sheet"])
            report["suites"][suite][REFERENCE_ROW] = row
        for row_name, method, options in method_variants(suite, methods):
            images, scores, seconds = [], [], []
            for case in tqdm(cases, desc=f"{suite}: {row_name}", disable=not progress, leave=False):
                image, elapsed = runner.generate(composition_for(case, method, **options))
                images.append(image)
                seconds.append(elapsed)
                scores.append(score(runner.judge, image, case))
            row = summarise(scores, seconds, tuple(alone))
            row["method"], row["options"] = method, options
            row["contact_sheet"] = f"quality/{suite}-{row_name.replace(' ', '-').replace('(', '').replace(')', '')}.png"
            contact_sheet(images, cases, scores, out / row["contact_sheet"])
            report["suites"][suite][row_name] = row
            if progress:
                print(f"{suite:10s} {row_name:22s} all right {row['all_right']:.0%} {row['ci']}  "
                      f"vanished {row['vanished']}  confused {row['confused']}  {row['seconds_per_image']:.2f} s")
    return report


def summary_table(report: dict, skip=()) -> str:
    """One line per method, one column per suite: all concepts right, with its 95 % interval (rows whose name
    contains one of `skip` left out)."""
    suites = [name for name, rows in report["suites"].items() if "skipped" not in rows]
    methods = [m for m in dict.fromkeys(m for name in suites for m in report["suites"][name])
               if not any(part in m for part in skip)]
    lines = ["| method | " + " | ".join(suites) + " |", "|---|" + "---|" * len(suites)]
    for method in methods:
        cells = []
        for name in suites:
            row = report["suites"][name].get(method)
            cells.append(f"{row['all_right']:.0%} ({row['ci'][0]:.0%}–{row['ci'][1]:.0%})" if row else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = [f"Split `{report['split']}` (seeds from {report['first_seed']}), {report['steps']} steps, guidance "
             f"{report['guidance']}; measured by `studio bench quality` (each row's own command is in quality.json).",
             "", "All concepts right (95 % Wilson interval):", "", summary_table(report), ""]
    for suite, rows in report["suites"].items():
        lines.append(f"**{suite}**" + (f": skipped, {rows['skipped']}" if "skipped" in rows else ""))
        if "skipped" in rows:
            lines.append("")
            continue
        style = any("style_applied" in r for r in rows.values())
        head = "| method | all right | 95 % CI | vanished | confused | shape acc. (alone) |"
        head += " style applied | leakage |" if style else ""
        head += " s / image |"
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for name, r in rows.items():
            cells = [name, f"{r['all_right']:.1%}", f"{r['ci'][0]:.0%}–{r['ci'][1]:.0%}", str(r["vanished"]),
                     str(r["confused"]), f"{r['shape_accuracy']:.0%} ({r['shape_accuracy_alone']:.0%})"]
            if style:
                cells += [f"{r['style_applied']:.0%}", f"{r['leakage']:.0%}"]
            cells.append(f"{r['seconds_per_image']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def ordered_rows(rows: dict) -> dict:
    """A suite's rows in one order whatever runs measured them: the reference first, then by method as BOX_METHODS
    lists them, each method's variants after it."""
    def key(item):
        name, row = item
        if name == REFERENCE_ROW:
            return (-1,)
        method = row.get("method")
        return (BOX_METHODS.index(method) if method in BOX_METHODS else len(BOX_METHODS),)

    return dict(sorted(rows.items(), key=key))


def merged_with_earlier(report: dict, path: Path) -> dict:
    """A run of some suites or methods replaces those rows in an earlier report of the same split and settings and
    keeps the others (each row names the command that measured it)."""
    if not path.exists():
        return report
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        return report
    same = all(earlier.get(k) == report[k] for k in ("split", "first_seed", "steps", "guidance", "overrides"))
    if not same:
        return report
    suites = {name: dict(rows) for name, rows in earlier.get("suites", {}).items() if "skipped" not in rows}
    for name, rows in report["suites"].items():
        suites[name] = rows if "skipped" in rows else {**suites.get(name, {}), **rows}
    for name, rows in suites.items():
        if "skipped" not in rows:
            suites[name] = ordered_rows(rows)
    runs = earlier.get("runs") or [{"command": earlier.get("command"), "minutes": earlier.get("minutes")}]
    return {**report, "runs": runs + [{"command": report["command"], "minutes": report["minutes"]}],
            "suites": {name: suites[name] for name in SUITES if name in suites}}


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(prog="studio bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--methods", nargs="+", default=list(BOX_METHODS))
    parser.add_argument("--n", type=int, default=None, help="Compositions per suite (default 12; --quick 2).")
    parser.add_argument("--split", default="test", choices=tuple(SPLIT_SEED))
    parser.add_argument("--quick", action="store_true", help="A CI-sized run: 2 cases of one suite, 2 methods.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                        help="A method parameter for this run (JSON value), e.g. regional.auto_threshold=0.3: to try "
                             "settings on the dev split.")
    args = parser.parse_args(argv)
    for item in args.set:
        try:
            key, value = item.split("=", 1)
            method, param = key.split(".", 1)
            OVERRIDES.setdefault(method, {})[param] = json.loads(value)
        except ValueError:
            raise SystemExit(f"error: --set {item!r} is not METHOD.PARAM=VALUE with a JSON value.") from None
    if args.quick:
        suites, methods, n = ([args.suite[0]] if len(args.suite) < len(SUITES) else ["distinct"],
                              args.methods if args.methods != list(BOX_METHODS) else ["merge", "regional"], args.n or 2)
    else:
        suites, methods, n = args.suite, args.methods, args.n or 12
    from composers import registry

    unknown = [m for m in methods if m not in registry()]
    if unknown:
        raise SystemExit(f"error: unknown method {unknown[0]!r}; choose from {', '.join(registry())}.")
    torch.manual_seed(0)
    start = time.perf_counter()
    report = run(suites, methods, n, args.split, args.out)
    report["command"] = "studio bench quality " + " ".join(argv or [])
    report["minutes"] = round((time.perf_counter() - start) / 60, 1)
    for rows in report["suites"].values():
        rows_command = {"command": report["command"]}
        for row in rows.values():
            if isinstance(row, dict):
                row.update(rows_command)
    report = merged_with_earlier(report, args.out / "quality.json")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=1))
    (args.out / "quality.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.md'} ({report['minutes']} min)")


if __name__ == "__main__":
    main()
