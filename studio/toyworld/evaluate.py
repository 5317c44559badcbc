"""The quality bar of the bundled model, measured by the judge on 64 seeded prompts.

Half of the prompts name a single object, half two; every other prompt uses a colour–shape pair held
out from training. A prompt counts as right when the judge finds, in each named slot, the named shape
in the named colour.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from studio.toyworld.judge import NOTHING, Judge
from studio.toyworld.render import (BASE_SHAPES, BASE_TEXTURES, HELD_OUT_PAIRS, NOVEL_PALETTES, Scene,
                                    random_scene)


@dataclass
class EvalPrompt:
    scene: Scene
    held_out: bool

    @property
    def caption(self) -> str:
        return self.scene.caption()


def scene_right(judge: Judge, image, scene: Scene) -> bool:
    """The judge finds, in each object's slot, the named shape in the named colour."""
    return scene_right_from_verdicts(judge.slots(image), scene)


def scene_right_from_verdicts(verdicts: dict, scene: Scene) -> bool:
    return all(verdicts[o.slot].matches(shape=o.shape, colour=o.colour) for o in scene.objects)


def wears_its_style(verdict, obj) -> bool:
    """The judge finds the object's style: its palette, or its texture in its named colour."""
    return verdict.colour == obj.palette if obj.palette else verdict.matches(texture=obj.texture, colour=obj.colour)


def object_counts(verdicts: dict, scene: Scene) -> dict[str, int]:
    """Why prompts fail: of the named objects, how many have something in their slot, and of those how many
    have the named colour (the palette's, for an object in a palette), the named shape and the named texture (the
    quality bar does not ask for texture); and
    how many objects were drawn in slots the prompt left empty."""
    named = {o.slot: o for o in scene.objects}
    drawn = {slot for slot, v in verdicts.items() if v.shape != NOTHING}
    in_slot = drawn & named.keys()
    return {"named": len(named), "drawn_in_slot": len(in_slot),
            "colour_right": sum(verdicts[s].colour == named[s].judged_colour for s in in_slot),
            "shape_right": sum(verdicts[s].shape == named[s].shape for s in in_slot),
            "texture_right": sum(verdicts[s].texture == named[s].texture for s in in_slot),
            "unasked_objects": len(drawn - named.keys())}


def evaluation_prompts(n: int = 64, seed: int = 2024) -> list[EvalPrompt]:
    rng = random.Random(seed)
    prompts = []
    held = sorted(HELD_OUT_PAIRS)
    for i in range(n):
        n_objects = 1 if i < n // 2 else 2
        scene = random_scene(rng, n_objects=n_objects, shapes=BASE_SHAPES, textures=BASE_TEXTURES)
        is_held = i % 2 == 1
        if is_held:
            colour, shape = held[rng.randrange(len(held))]
            scene.objects[0].colour, scene.objects[0].shape = colour, shape
        prompts.append(EvalPrompt(scene, is_held))
    return prompts


def evaluate_model(pipe, judge: Judge | None = None, n: int = 64, steps: int = 20, guidance: float = 5.0,
                   seed: int = 2024, images_out=None) -> dict:
    judge = judge or Judge.load()
    prompts = evaluation_prompts(n, seed)
    results = {"single": [], "double": [], "single_held_out": [], "double_held_out": []}
    elapsed = []
    counts = Counter()
    for i, p in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        start = time.perf_counter()
        image = pipe(p.caption, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
        elapsed.append(time.perf_counter() - start)
        verdicts = judge.slots(image)
        ok = scene_right_from_verdicts(verdicts, p.scene)
        counts.update(object_counts(verdicts, p.scene))
        key = "single" if len(p.scene.objects) == 1 else "double"
        results[key].append(ok)
        if p.held_out:
            results[key + "_held_out"].append(ok)
        if images_out is not None:
            image.save(images_out / f"{i:02d}-{'ok' if ok else 'no'}.png")
    report = {k: sum(v) / len(v) for k, v in results.items() if v}
    report["n_prompts"] = n
    report["objects"] = dict(counts)
    report["seconds_per_image"] = sorted(elapsed)[len(elapsed) // 2]
    report["steps"] = steps
    report["guidance"] = guidance
    report["prompt_seed"] = seed
    return report


def evaluate_vae(vae, judge: Judge | None = None, n: int = 64, seed: int = 2024, per_texture: int = 32) -> dict:
    """The ceiling the VAE sets: the evaluation prompts' own renders, encoded (posterior mean) and decoded, scored
    by the judge as `evaluate_model` scores generated images (no diffusion model can draw what its decoder cannot
    give back). Also the renders themselves, unencoded, and the decoded images' mean absolute error; and, per
    texture (the style LoRAs' too), of `per_texture` one-object renders how many come back in that texture and
    colour: a style LoRA cannot score above its texture's round trip."""
    from diffusers.image_processor import VaeImageProcessor

    from studio.toyworld.render import TEXTURES, image_to_tensor_array, render

    judge = judge or Judge.load()
    to_image = VaeImageProcessor()  # as the pipeline turns its decoded images into PIL images

    def round_trip(image):
        pixels = torch.from_numpy(image_to_tensor_array(image))[None]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
        return to_image.postprocess(decoded, output_type="pil")[0], float((decoded - pixels).abs().mean() * 127.5)

    results = {"single": [], "double": [], "single_renders": [], "double_renders": []}
    counts, colours = Counter(), Counter()
    errors = []
    for i, p in enumerate(evaluation_prompts(n, seed)):
        image = render(p.scene, seed + i)
        decoded_image, error = round_trip(image)
        errors.append(error)
        key = "single" if len(p.scene.objects) == 1 else "double"
        verdicts = judge.slots(decoded_image)
        results[key].append(scene_right_from_verdicts(verdicts, p.scene))
        results[key + "_renders"].append(scene_right(judge, image, p.scene))
        counts.update(object_counts(verdicts, p.scene))
        colours.update(f"{o.colour} as {verdicts[o.slot].colour}" for o in p.scene.objects)
    report = {k: sum(v) / len(v) for k, v in results.items() if v}
    report["objects"] = dict(counts)
    report["colours"] = dict(sorted(colours.items()))  # "named as judged": where colours are lost
    report["recon_mae_0_255"] = sum(errors) / len(errors)
    report["n_prompts"] = n
    rng = random.Random(seed + 1)
    textures = {}
    for texture in TEXTURES:
        right = 0
        for i in range(per_texture):
            scene = random_scene(rng, n_objects=1, textures=(texture,), allow_held_out=True)
            obj = scene.objects[0]
            right += judge.slots(round_trip(render(scene, seed + i))[0])[obj.slot].matches(texture=texture,
                                                                                          colour=obj.colour)
        textures[texture] = right
    report["textures_given_back"] = {**textures, "of": per_texture}
    palettes = {}
    for palette in NOVEL_PALETTES:  # the style LoRAs' palettes: the named shape in the palette's colour class
        right = 0
        for i in range(per_texture):
            scene = random_scene(rng, n_objects=1, allow_held_out=True)
            obj = scene.objects[0]
            obj.palette = palette
            right += judge.slots(round_trip(render(scene, seed + i))[0])[obj.slot].matches(shape=obj.shape,
                                                                                          colour=palette)
        palettes[palette] = right
    report["palettes_given_back"] = {**palettes, "of": per_texture}
    return report


def evaluate_lora(pipe, lora_path, judge: Judge | None = None, n: int = 128, steps: int = 20, guidance: float = 5.0,
                  weight: float = 1.0, seed: int = 4048) -> dict:
    """A LoRA of train-lora used alone: one object (its shape, or a base shape in its texture or palette) per
    prompt, with the trigger word; right when the judge finds, in the object's slot, the taught shape or texture
    in the named colour, or the named shape in the taught palette.
    Also scores ordinary prompts with the LoRA attached, to show what it does to them, and says why taught prompts
    fail: of the objects, how many were drawn in their slot, in the taught shape, texture or palette, in the named
    colour (or palette), and what the judge saw in place of what the LoRA teaches."""
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora
    from studio.toyworld.lora_train import LoraTrainConfig, lora_scene

    weights = load_lora(lora_path)
    cfg = LoraTrainConfig(**json.loads(weights.info.metadata["studio_train_config"]))
    judge = judge or Judge.load()
    rng = random.Random(seed)
    attach_lora(pipe, weights, "evaluated", weight)
    try:
        right, ordinary_right = [], []
        counts = Counter()
        taught_count = 0
        drawn_instead = Counter()  # the judge's shape, texture or colour where the taught one is missing
        for i in range(n):
            scene = lora_scene(rng, cfg)
            scene.objects = scene.objects[:1]
            generator = torch.Generator().manual_seed(seed + i)
            image = pipe(scene.caption(), num_inference_steps=steps, guidance_scale=guidance,
                         generator=generator).images[0]
            obj = scene.objects[0]
            verdicts = judge.slots(image)
            verdict = verdicts[obj.slot]
            if cfg.kind == "concept":
                seen, taught = verdict.shape, verdict.shape == obj.shape
                right.append(taught and verdict.colour == obj.colour)
            else:  # a palette takes the colour's place, so the shape is asked for beside it
                seen = verdict.colour if obj.palette else verdict.texture
                taught = seen == (obj.palette or obj.texture)
                right.append(wears_its_style(verdict, obj) and (not obj.palette or verdict.shape == obj.shape))
            objects = object_counts(verdicts, scene)
            taught_count += taught
            counts.update(objects)
            if objects["drawn_in_slot"] and not taught:
                drawn_instead[seen] += 1
        for i, p in enumerate(evaluation_prompts(n=16, seed=seed)):
            generator = torch.Generator().manual_seed(seed + 100 + i)
            image = pipe(p.caption, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
            ordinary_right.append(scene_right(judge, image, p.scene))
    finally:
        detach_lora(pipe, "evaluated")
    return {"lora": str(lora_path), "kind": cfg.kind, "subject": cfg.subject, "trigger": cfg.trigger,
            "taught_right": sum(right) / len(right), "ordinary_prompts_right_with_lora": sum(ordinary_right) / 16,
            "n": n, "weight": weight, "seed": seed,
            "objects": {"drawn_in_slot": counts["drawn_in_slot"],
                        "taught": taught_count,
                        "colour_right": counts["colour_right"], "drawn_instead": dict(drawn_instead.most_common())}}


def evaluate_b4m(pipe, content_path, style_path, judge: Judge | None = None, n: int = 32, steps: int = 20,
                 guidance: float = 5.0, seed: int = 6072, assembled_path=None) -> dict:
    """A B4M pair of the shapes world: prompts name the content's shape in the style's texture or palette (both
    trigger words). Each prompt is generated with the assembled adapter (assembled here, or `assembled_path`: a file of
    `studio b4m make`, e.g. after its joint fine-tune), with the content adapter alone and with the style
    adapter alone; the judge scores the taught shape (in the colour it should have), the taught style (a texture in
    the named colour, or a palette) and both together. The content adapter alone is also scored on the same prompts
    without the style (its shape in the named colour), what it draws on its own terms."""
    from studio.training.b4m import BreakConfig
    from studio.training.plp import assemble, assembled_embeddings, assembled_weights
    from studio.errors import LoraError
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora
    from studio.toyworld.render import random_object

    content, style = load_lora(content_path), load_lora(style_path)
    for path, weights in ((content_path, content), (style_path, style)):
        if "studio_b4m_config" not in weights.info.metadata:
            raise LoraError(f"{Path(path).name} is not a shapes-world B4M adapter (made by `studio b4m break --kind "
                            "... --subject ... --trigger ...`), so the judge cannot score it.")
    content_cfg, style_cfg = (BreakConfig(**json.loads(w.info.metadata["studio_b4m_config"])) for w in (content, style))
    judge = judge or Judge.load()
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        if style_cfg.subject in NOVEL_PALETTES:
            obj = random_object(rng, shapes=(content_cfg.subject,), allow_held_out=True)
            obj.palette = style_cfg.subject
        else:
            obj = random_object(rng, shapes=(content_cfg.subject,), textures=(style_cfg.subject,), allow_held_out=True)
        scenes.append(Scene([obj], rng.choice(("white", "grey", "black")),
                            triggers={content_cfg.subject: content_cfg.trigger, style_cfg.subject: style_cfg.trigger},
                            learnt_triggers=style_cfg.embedding, trigger_after_noun=style_cfg.trigger_after_noun))
    if assembled_path is not None:
        assembled = load_lora(assembled_path)
        if assembled.info.metadata.get("b4m_role") != "assembled":
            raise LoraError(f"{Path(assembled_path).name} is not an assembled B4M adapter (made by `studio b4m make`).")
    else:
        assembled = assembled_weights(assemble(Path(content_path), Path(style_path)), content.info,
                                      assembled_embeddings(Path(content_path), Path(style_path)))
    variants = {"assembled": assembled,
                "content_alone": content, "style_alone": style}
    report = {"content": f"{content_cfg.subject} ({content_cfg.trigger})",
              "style": f"{style_cfg.subject} ({style_cfg.trigger})", "n": n, "seed": seed,
              "assembled_from": str(assembled_path) if assembled_path is not None else "the pair, here"}
    # the content on its own terms: the same prompts without the style (a texture style gives way to "solid")
    without_style = [Scene([replace(s.objects[0], palette="", texture=s.objects[0].texture
                                    if style_cfg.subject in NOVEL_PALETTES else "solid")], s.background,
                           triggers={content_cfg.subject: content_cfg.trigger}) for s in scenes]

    def verdicts(prompt_scenes):
        """The judge's verdict on each scene's object, generated with the attached adapter (seed + index)."""
        out = []
        for i, scene in enumerate(prompt_scenes):
            image = pipe(scene.caption(), num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed + i)).images[0]
            out.append(judge.slots(image)[scene.objects[0].slot])
        return out

    for label, weights in variants.items():
        attach_lora(pipe, weights, "b4m_evaluated")
        try:
            seen = verdicts(scenes)
            seen_without_style = verdicts(without_style) if label == "content_alone" else None
        finally:
            detach_lora(pipe, "b4m_evaluated")
        objects = [scene.objects[0] for scene in scenes]
        shape_ok = [v.matches(shape=o.shape, colour=o.judged_colour) for v, o in zip(seen, objects)]
        style_ok = [wears_its_style(v, o) for v, o in zip(seen, objects)]
        report[label] = {"shape_right": sum(shape_ok) / n, "style_right": sum(style_ok) / n,
                         "content_in_style": sum(a and b for a, b in zip(shape_ok, style_ok)) / n}
        if seen_without_style is not None:
            report[label]["shape_right_without_style_word"] = sum(
                v.matches(shape=s.objects[0].shape, colour=s.objects[0].colour)
                for v, s in zip(seen_without_style, without_style)) / n
    report["example_prompt"] = scenes[0].caption()
    return report
