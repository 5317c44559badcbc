"""The web studio (Gradio): `studio serve`, or `python app.py`.

The Compose tab is a design tool: a canvas where each LoRA has its colour (drag boxes, paint masks), a card per
LoRA, the method's parameters as a form made from its pydantic schema with the run's expected cost, Generate with
live previews and a per-user Stop, and the result large with each concept's attention map and mask laid over it.
Every result is kept in the outputs folder (History); dropping a PNG made here restores its whole composition.
Programs use the named API: `generate`, `inspect_lora`, `methods`, `open_preset` (and `stop`, `upload_loras`)."""
from __future__ import annotations

import base64
import io
import os
import random
import sys
import uuid
from contextlib import closing
from pathlib import Path

import gradio as gr
from PIL import Image

from composers import registry
from studio import paths
from studio.errors import Cancelled, StudioError
from studio.samplers import SAMPLERS
from studio.spec import Composition, composition_from_json, load_preset
from studio.web_canvas import RegionCanvas, canvas_value
from studio.web_state import (BUNDLED, COLOURS, StudioState, apply_canvas, canvas_loras, concept_label, concept_layers,
                              draft_composition, enlarged, family_sizes, overlaid, parse_size, region_kind, size_label)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MODEL_DEFAULT = "model default"
PLACEMENTS = ["box", "painted mask", "automatic", "whole image"]
OVERLAY_KINDS = ["attention", "mask"]
PRIVATE = {"api_visibility": "private"}  # the page's own events: programs use the named endpoints
QUICK = {**PRIVATE, "queue": False, "show_progress": "hidden"}
DEVICE = {"concurrency_id": "device", "concurrency_limit": 1}  # one run (or model load) at a time, in a queue
CSS = """
#title {margin-bottom: 0}
.small-note {font-size: 0.85em; opacity: 0.8}
#result img, #history img {image-rendering: pixelated}
.lora-card {border-left: 6px solid #888 !important}
""" + "".join(f".lora-colour-{i} {{border-left-color: {c} !important}}\n" for i, c in enumerate(COLOURS)) + """
.warning-note {color: #b3261e; font-size: 0.9em}
"""
DEFAULT_PROMPT = ("a large solid red circle on the left and a large solid blue square on the right, white "
                  "background")


def empty_draft() -> dict:
    return {"loras": [], "params": {}, "params_method": "regional", "active": 0, "background": None}


def example_presets() -> list[str]:
    """The bundled presets (assets/presets), by name."""
    return sorted(p.stem for p in paths.EXAMPLE_PRESETS.glob("*.json"))


def model_sentence(state: StudioState) -> str:
    return (f"Base model: **{state.model_ref or BUNDLED}** ({state.family}, native {state.size}×{state.size} px, "
            f"{state.pipe.device}, {str(state.pipe.dtype).replace('torch.', '')})")


def data_uri(image: Image.Image, longest: int = 512) -> str:
    """A picture small enough to travel inside the canvas's value (its background)."""
    image = image.convert("RGB")
    image.thumbnail((longest, longest))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def canvas_for(draft: dict, size: str) -> dict:
    width, height = parse_size(size)
    return canvas_value(width, height, canvas_loras(draft), draft.get("active", 0), draft.get("background"))


def fine_fields(draft: dict) -> list:
    """The fine-adjustment row for the active LoRA: which one, its placement and its box."""
    if not draft["loras"]:
        return [gr.update(value="whole image"), *[gr.update(value=None)] * 4,
                "Add a LoRA, then drag its box or paint its mask on the canvas."]
    card = draft["loras"][min(draft.get("active", 0), len(draft["loras"]) - 1)]
    box = (card.get("region") or {}).get("box") or [None] * 4
    note = (f"Active: <span style='color:{card['colour']}'>■</span> **{card['name']}**: drag on the canvas for its box, "
            "or paint its mask; the numbers below adjust the box.")
    return [region_kind(card.get("region")), *[None if v is None else round(float(v), 3) for v in box], note]


# --- method parameters as a form ---------------------------------------------------------------------------------

def param_fields(method: str) -> list[dict]:
    """The method's parameters from its pydantic schema, as form fields: name, kind (slider, number, integer,
    checkbox, choice, list), default, bounds, choices and a one-line explanation."""
    schema = registry()[method].Params.model_json_schema()
    fields = []
    for name, spec in schema.get("properties", {}).items():
        options = spec.get("anyOf")
        optional = bool(options) and any(o.get("type") == "null" for o in options)
        typed = next((o for o in options if o.get("type") != "null"), {}) if options else spec
        kind = typed.get("type", "string")
        low = typed.get("minimum", typed.get("exclusiveMinimum"))
        high = typed.get("maximum", typed.get("exclusiveMaximum"))
        choices = typed.get("enum")
        pattern = typed.get("pattern", "")
        if choices is None and pattern.startswith("^(") and pattern.endswith(")$"):
            choices = [c.replace("\\", "") for c in pattern[2:-2].split("|")]
        field = {"name": name, "label": name.replace("_", " "), "default": spec.get("default"),
                 "info": (spec.get("description") or "").split(". ")[0].strip(), "minimum": low, "maximum": high,
                 "optional": optional}
        if choices:
            field["kind"] = "choice"
            field["choices"] = choices
        elif kind == "boolean":
            field["kind"] = "checkbox"
        elif kind in ("number", "integer") and low is not None and high is not None:
            field["kind"] = "slider"
            field["step"] = 1 if kind == "integer" else round((high - low) / 100, 6)
        elif kind in ("number", "integer"):
            field["kind"] = kind
        elif kind == "array":
            field["kind"] = "list"
            field["items"] = typed.get("items", {}).get("type", "string")
        else:
            field["kind"] = "text"
        fields.append(field)
    return fields


def field_value(field: dict, raw):
    """A form control's value as the parameter's value (None: the default)."""
    if raw is None or raw == "":
        return None
    if field["kind"] == "list":
        items = [part.strip() for part in str(raw).split(",") if part.strip()]
        cast = {"integer": int, "number": float}.get(field["items"], str)
        try:
            return [cast(item) for item in items]
        except ValueError:
            raise StudioError(f"The parameter {field['name']} is a comma-separated list of {field['items']}s, "
                              f"not {raw!r}.") from None
    if field["kind"] in ("integer",) or (field["kind"] == "slider" and field.get("step") == 1):
        return int(raw)
    return raw


def param_control(field: dict, value):
    """The Gradio control of one parameter field, showing `value` (else the default)."""
    shown = field["default"] if value is None else value
    info = field["info"] + (f" (default {field['default']})" if field["default"] is not None else "")
    common = {"label": field["label"], "info": info, "key": f"param-{field['name']}", "preserved_by_key": None}
    if field["kind"] == "choice":
        return gr.Dropdown(field["choices"], value=shown, **common)
    if field["kind"] == "checkbox":
        return gr.Checkbox(value=bool(shown), **common)
    if field["kind"] == "slider":
        return gr.Slider(field["minimum"], field["maximum"], value=shown, step=field["step"], **common)
    if field["kind"] in ("number", "integer"):
        return gr.Number(value=shown, minimum=field["minimum"], precision=0 if field["kind"] == "integer" else None,
                         **common)
    if field["kind"] == "list":
        return gr.Textbox(value=", ".join(str(v) for v in shown or []), **common)
    return gr.Textbox(value=shown, **common)


def cost_sentence(state: StudioState, method: str, draft: dict, steps, size: str) -> str:
    """"≈ N UNet passes per step", in the method's words too, and the expected time of the run on this device."""
    composer = registry()[method]
    try:
        params = composer.Params.model_validate(draft.get("params") if draft.get("params_method") == method else {})
        auto = sum(bool((card.get("region") or {}).get("auto")) for card in draft["loras"])
        passes = composer.expected_passes(len(draft["loras"]), max(1, int(steps or 1)), params, auto_regions=auto)
    except (ValueError, TypeError):
        passes = 1.0
    width, height = parse_size(size)
    seconds = state.timing.expected_seconds(passes, max(1, int(steps or 1)), width * height)
    when = (f"about {seconds:.1f} s for {int(steps)} steps on this {state.pipe.device.type.upper()}" if seconds is not None
            else "the expected time shows after the first run on this device")
    return f"Cost: ≈ {passes:.2f} UNet passes per step ({composer.passes_doc}); {when}."


# --- the page ----------------------------------------------------------------------------------------------------

def build_ui(state: StudioState) -> gr.Blocks:
    methods = list(registry())
    native = size_label(state.size, state.size)
    with gr.Blocks(title="LoRA Studio") as demo:
        draft = gr.State(empty_draft())
        cards_version = gr.State(0)  # a new value re-draws the LoRA cards (LoRAs added, removed, restored)
        params_version = gr.State(0)  # likewise the method's form
        shown = gr.State(None)  # the path of the result on screen
        gr.Markdown("# LoRA Studio", elem_id="title")
        model_note = gr.Markdown(model_sentence(state), elem_classes="small-note")

        with gr.Tabs() as tabs:
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    with gr.Column(scale=5):
                        with gr.Accordion("Model", open=False):
                            checkpoints = [str(p) for p in state.models.checkpoints] if state.models else []
                            model_choice = gr.Dropdown([BUNDLED, *checkpoints], value=state.model_ref or BUNDLED,
                                                       allow_custom_value=True,
                                                       label="Base model: bundled, a diffusers folder, a .safetensors "
                                                             "checkpoint or a hub id (online)")
                            load_model = gr.Button("Load model")
                        prompt = gr.Textbox(label="Prompt", lines=2, value=DEFAULT_PROMPT)
                        negative = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            size = gr.Dropdown(family_sizes(state.family, state.size, state.pipe.vae_scale_factor),
                                               value=native, label="Size (width×height)")
                            steps = gr.Slider(1, state.limits.max_steps, value=20, step=1, label="Steps")
                            guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                            sampler = gr.Dropdown([MODEL_DEFAULT, *SAMPLERS], value=MODEL_DEFAULT, label="Sampler")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                            dice = gr.Button("Random seed", scale=0, min_width=120, elem_id="dice")
                            batch = gr.Number(value=1, precision=0, minimum=1, maximum=state.limits.max_images,
                                              label="Images (seed, seed+1, …)")
                        method = gr.Dropdown(methods, value="regional", label="Method")
                        method_note = gr.Markdown(registry()["regional"].summary, elem_classes="small-note")
                        cost = gr.Markdown(elem_id="cost", elem_classes="small-note")
                        with gr.Accordion("Method parameters", open=False):
                            @gr.render(inputs=[method, draft], triggers=[method.change, params_version.change, demo.load],
                                   concurrency_limit=None)
                            def method_form(name, current):
                                values = current.get("params", {}) if current.get("params_method") == name else {}
                                for field in param_fields(name):
                                    control = param_control(field, values.get(field["name"]))

                                    def on_param(raw, d, steps_value, size_value, field=field):
                                        try:
                                            value = field_value(field, raw)
                                        except StudioError as exc:
                                            raise gr.Error(str(exc)) from None
                                        if d.get("params_method") != name:
                                            d["params"], d["params_method"] = {}, name
                                        if value is None or value == field["default"]:
                                            d["params"].pop(field["name"], None)
                                        else:
                                            d["params"][field["name"]] = value
                                        return d, cost_sentence(state, name, d, steps_value, size_value)

                                    control.input(on_param, [control, draft, steps, size], [draft, cost], **QUICK)

                        gr.Markdown("### LoRAs")
                        with gr.Row():
                            add_choice = gr.Dropdown(list(state.lora_files()), value=None, label="From the library",
                                                     scale=3)
                            add_button = gr.Button("Add LoRA", scale=1)
                            refresh_button = gr.Button("↻ Library", scale=1)
                        upload = gr.File(label=f"Upload LoRA files (.safetensors, up to "
                                               f"{state.limits.max_upload_bytes / 2**20:.0f} MiB each)",
                                         file_count="multiple", file_types=[".safetensors"], height=90)
                        upload_note = gr.Markdown(elem_classes="small-note")

                        @gr.render(inputs=[draft], triggers=[cards_version.change, demo.load], concurrency_limit=None)
                        def lora_cards(current):
                            for index, card in enumerate(current["loras"]):
                                key = f"{index}-{card['file']}"
                                colour_class = f"lora-colour-{index % len(COLOURS)}"
                                with gr.Group(elem_classes=["lora-card", colour_class], key=f"card-{key}"):
                                    with gr.Row(equal_height=True):
                                        gr.HTML(card_header(index, card), key=f"head-{key}", padding=False)
                                        remove = gr.Button("Remove", size="sm", scale=0, min_width=90,
                                                           key=f"remove-{key}")
                                    with gr.Row():
                                        weight = gr.Slider(-2, 2, value=card["weight"], step=0.05, label="Weight",
                                                           key=f"weight-{key}", preserved_by_key=None)
                                        role = gr.Radio(["concept", "style"], value=card["role"], label="Role",
                                                        key=f"role-{key}", preserved_by_key=None)
                                    triggers = gr.Textbox(", ".join(card["trigger_words"]),
                                                          label="Trigger words (comma separated)",
                                                          key=f"triggers-{key}", preserved_by_key=None)
                                    region_prompt = gr.Textbox(card["prompt"], label="Region prompt (default: the prompt)",
                                                               key=f"prompt-{key}", preserved_by_key=None)

                                def setter(field, convert=lambda v: v, index=index):
                                    def on_field(value, d):
                                        if index < len(d["loras"]):
                                            d["loras"][index][field] = convert(value)
                                        return d
                                    return on_field

                                weight.input(setter("weight", float), [weight, draft], draft, **QUICK)
                                role.input(setter("role"), [role, draft], draft, **QUICK)
                                triggers.input(setter("trigger_words", lambda v: [w.strip() for w in (v or "").split(",")
                                                                                  if w.strip()]),
                                               [triggers, draft], draft, **QUICK)
                                region_prompt.input(setter("prompt", lambda v: v or ""), [region_prompt, draft], draft,
                                                    **QUICK)

                                def on_remove(d, version, size_value, steps_value, method_value, index=index):
                                    del d["loras"][index]
                                    recolour(d)
                                    d["active"] = max(0, min(d.get("active", 0), len(d["loras"]) - 1))
                                    return (d, version + 1, canvas_for(d, size_value), *fine_fields(d),
                                            cost_sentence(state, method_value, d, steps_value, size_value))

                                remove.click(on_remove, [draft, cards_version, size, steps, method],
                                             [draft, cards_version, canvas, *fine_outputs, cost], **PRIVATE)

                        with gr.Row():
                            example = gr.Dropdown(example_presets(), value=None, label="Example presets",
                                                  elem_id="examples")
                            dropped = gr.File(label="Open a preset, or drop a PNG made here", file_types=[".json", ".png"],
                                              elem_id="drop", height=90)

                    with gr.Column(scale=5):
                        canvas = RegionCanvas(canvas_for(empty_draft(), native), elem_id="canvas")
                        active_note = gr.Markdown(elem_classes="small-note")
                        with gr.Row():
                            placement = gr.Radio(PLACEMENTS, value="whole image", label="Placement of the active LoRA",
                                                 scale=3)
                            box_fields = [gr.Number(None, label=name, minimum=0, maximum=1, step=0.01, min_width=70)
                                          for name in ("x0", "y0", "x1", "y1")]
                        fine_outputs = [placement, *box_fields, active_note]
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Stop", elem_id="stop")
                        result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="result",
                                          height=520)
                        with gr.Row():
                            overlay_concepts = gr.CheckboxGroup([], label="Overlays: concepts", elem_id="overlays")
                            overlay_kinds = gr.CheckboxGroup(OVERLAY_KINDS, value=OVERLAY_KINDS, label="Show",
                                                             elem_id="overlay-kinds")
                        info = gr.Markdown(elem_id="run-note", elem_classes="small-note")
                        with gr.Row():
                            result_file = gr.File(label="The image (PNG with its composition)")
                            preset_out = gr.File(label="Its preset (.json)")

            with gr.Tab("History", id="history"):
                gr.Markdown(f"Every result in the outputs folder ({state.outputs}), newest first. Select one, then use "
                            "its composition.", elem_classes="small-note")
                history = gr.Gallery(label="History", columns=6, height=460, format="png", elem_id="history",
                                     allow_preview=False)
                picked = gr.State(None)
                with gr.Row():
                    use_history = gr.Button("Use this composition", elem_id="use-history")
                    refresh_history = gr.Button("↻ Refresh")

            with gr.Tab("Library"):
                gr.Markdown("Every LoRA file the studio found, with what it is; files it cannot use say why.",
                            elem_classes="small-note")
                table = gr.Dataframe(headers=["name", "format", "base", "rank", "trigger words", "status"],
                                     value=state.library_rows(), interactive=False, wrap=True)
                rescan = gr.Button("Rescan")
                if state.models is not None:
                    gr.Markdown(f"**Checkpoints** of the models folder ({state.models.kind}): "
                                + (", ".join(f"`{p.stem}`" for p in state.models.checkpoints) or "none")
                                + ". Load one from the Model panel.", elem_classes="small-note")

            with gr.Tab("Break-for-Make"):
                gr.Markdown("Assemble a B4M **content** adapter and a B4M **style** adapter trained from the same "
                            "seed into one LoRA. Two ordinary LoRAs cannot be assembled: their internal bases are "
                            "arbitrary, so the halves would not fit together.", elem_classes="small-note")
                with gr.Row():
                    content = gr.Dropdown(list(state.lora_files()), label="Content adapter", allow_custom_value=True)
                    style = gr.Dropdown(list(state.lora_files()), label="Style adapter", allow_custom_value=True)
                    finetune = gr.Number(0, label="Joint fine-tune steps (0: assembly alone; official: 1000)",
                                         minimum=0, maximum=5000, precision=0)
                assemble_button = gr.Button("Assemble")
                assembled = gr.File(label="Assembled LoRA")
                b4m_note = gr.Markdown()

        lora_dropdowns = [add_choice, content, style]
        form = [prompt, negative, method, size, steps, guidance, seed, sampler]
        restore_outputs = [*form, draft, cards_version, params_version, canvas, *fine_outputs, cost]

        # --- composing ----------------------------------------------------------------------------------------

        def on_method(name, d, steps_value, size_value):
            composer = registry()[name]
            if d.get("params_method") != name:
                d["params"], d["params_method"] = {}, name
            note = composer.summary + (f" *{composer.limits}*" if composer.limits else "")
            return note, d, cost_sentence(state, name, d, steps_value, size_value)

        method.change(on_method, [method, draft, steps, size], [method_note, draft, cost], **QUICK)
        for control in (steps, size):
            control.change(lambda m, d, st, si: cost_sentence(state, m, d, st, si), [method, draft, steps, size],
                           cost, **QUICK)
        size.change(lambda d, s: canvas_for(d, s), [draft, size], canvas, **QUICK)
        dice.click(lambda: random.randrange(2**32), None, seed, **QUICK)

        def on_add(label, d, version, size_value, steps_value, method_value):
            if not label:
                raise gr.Error("Choose a LoRA from the library first (or upload one).")
            path = state.lora_files().get(label)
            if path is None:
                raise gr.Error(f"{label} is not in the library; refresh the library or upload the file.")
            if len(d["loras"]) >= state.limits.max_loras:
                raise gr.Error(f"A composition holds at most {state.limits.max_loras} LoRAs.")
            d["loras"].append(state.new_card(path, len(d["loras"])))
            d["active"] = len(d["loras"]) - 1
            return (d, version + 1, canvas_for(d, size_value), *fine_fields(d),
                    cost_sentence(state, method_value, d, steps_value, size_value))

        add_button.click(on_add, [add_choice, draft, cards_version, size, steps, method],
                         [draft, cards_version, canvas, *fine_outputs, cost], **PRIVATE)

        def on_refresh():
            choices = list(state.lora_files(refresh=True))
            return [gr.update(choices=choices) for _ in lora_dropdowns] + [state.library_rows()]

        refresh_button.click(on_refresh, None, [*lora_dropdowns, table], **PRIVATE)
        rescan.click(on_refresh, None, [*lora_dropdowns, table], **PRIVATE)

        def on_upload(files):
            notes = []
            for file in files or []:
                path = file if isinstance(file, str) else file.name
                try:
                    kept = state.upload(path)
                    notes.append(f"Added **{kept.name}** to the library.")
                except (StudioError, OSError) as exc:
                    notes.append(f"**Refused:** {exc}")
            choices = list(state.lora_files())
            return (state.library_rows(), " ".join(notes), *[gr.update(choices=choices) for _ in lora_dropdowns])

        upload.upload(on_upload, upload, [table, upload_note, *lora_dropdowns], api_name="upload_loras")

        def on_canvas(value, d):
            try:
                apply_canvas(d, value or {})
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            return d, *fine_fields(d)

        canvas.edit(on_canvas, [canvas, draft], [draft, *fine_outputs], **QUICK)

        def on_placement(kind, d, size_value):
            if not d["loras"]:
                return d, canvas_for(d, size_value), *fine_fields(d)
            card = d["loras"][d.get("active", 0)]
            current = region_kind(card.get("region"))
            if kind == "box" and current != "box":
                card["region"] = {"box": [0.25, 0.25, 0.75, 0.75]}
            elif kind == "automatic":
                card["region"] = {"auto": True}
            elif kind == "whole image":
                card["region"] = None
            elif kind == "painted mask" and current != "painted mask":
                card["region"] = None
                gr.Info("Paint the mask on the canvas with the Paint tool.")
            return d, canvas_for(d, size_value), *fine_fields(d)

        placement.input(on_placement, [placement, draft, size], [draft, canvas, *fine_outputs], **QUICK)

        def on_box_field(d, size_value, *values):
            if not d["loras"] or any(v is None for v in values):
                return d, canvas_for(d, size_value)
            x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in values)
            if x1 - x0 < 0.01 or y1 - y0 < 0.01:
                raise gr.Error("A box needs x0 < x1 and y0 < y1.")
            d["loras"][d.get("active", 0)]["region"] = {"box": [x0, y0, x1, y1]}
            return d, canvas_for(d, size_value)

        for field in box_fields:
            field.input(on_box_field, [draft, size, *box_fields], [draft, canvas], **QUICK)

        # --- restoring compositions -----------------------------------------------------------------------------

        def restore(composition: Composition, d_version: int, p_version: int, background=None) -> list:
            d = state.draft_from(composition)
            d["params_method"] = composition.method
            d["background"] = background
            width = composition.width or state.size
            height = composition.height or state.size
            size_value = size_label(width, height)
            return [composition.prompt, composition.negative_prompt, composition.method,
                    gr.update(value=size_value, choices=sorted({*family_sizes(state.family, state.size,
                                                                              state.pipe.vae_scale_factor),
                                                                size_value}, key=lambda s: s != size_value)),
                    composition.steps, composition.guidance, composition.seed, composition.scheduler or MODEL_DEFAULT,
                    d, d_version + 1, p_version + 1, canvas_for(d, size_value), *fine_fields(d),
                    cost_sentence(state, composition.method, d, composition.steps, size_value)]

        def open_file(path: Path, d_version, p_version):
            try:
                composition = load_preset(path)
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            background = None
            if path.suffix.lower() == ".png":
                with Image.open(path) as image:
                    background = data_uri(image)
            return restore(composition, d_version, p_version, background)

        def on_drop(file, d_version, p_version):
            if file is None:
                return [gr.update()] * len(restore_outputs)
            return open_file(Path(file if isinstance(file, str) else file.name), d_version, p_version)

        dropped.upload(on_drop, [dropped, cards_version, params_version], restore_outputs, **PRIVATE)

        def on_example(name, d_version, p_version):
            if not name:
                return [gr.update()] * len(restore_outputs)
            if name not in example_presets():  # a client may send any text: only the examples are read
                raise gr.Error(f"There is no example preset named {name!r}.")
            return open_file(paths.EXAMPLE_PRESETS / f"{name}.json", d_version, p_version)

        example.input(on_example, [example, cards_version, params_version], restore_outputs, **PRIVATE)

        # --- generating -----------------------------------------------------------------------------------------

        def history_items():  # captioned by file name: a selection names its file (the list may have grown since)
            return [(str(p), p.stem) for p in state.history()]

        def overlay_choices(path: Path | None) -> list[str]:
            return [concept_label(name) for name in concept_layers(path)] if path else []

        def on_generate(prompt_value, negative_value, method_value, size_value, steps_value, guidance_value,
                        seed_value, sampler_value, batch_value, d, request: gr.Request, progress=gr.Progress()):
            width, height = parse_size(size_value)
            fields = {"base_model": state.model_ref, "prompt": prompt_value, "negative_prompt": negative_value or "",
                      "method": method_value, "width": width, "height": height, "steps": int(steps_value),
                      "guidance": float(guidance_value), "seed": int(seed_value or 0),
                      "scheduler": None if sampler_value == MODEL_DEFAULT else sampler_value}
            try:
                images = int(batch_value or 1)
                composition = state.admit(draft_composition(d, fields), images=images)
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            for k in range(images):
                one = composition.with_overrides(seed=(composition.seed + k) % 2**64)
                try:
                    # closed with this generator (Stop, a closed page): the run then ends within a step
                    with closing(state.run_events(one, request.session_hash)) as events:
                        for event in events:
                            if event.kind != "step":
                                break
                            progress((event.step, event.total), desc=step_description(event, k, images),
                                     unit="steps")
                            if event.preview is not None:
                                yield {result: enlarged(event.preview),
                                       info: f"Image {k + 1} of {images}: step {event.step} of {event.total}…"}
                except Cancelled as exc:
                    yield {info: f"Stopped: {exc}"}
                    return
                except StudioError as exc:
                    raise gr.Error(str(exc)) from None
                saved = state.save(event.result)
                preset_path = saved.with_suffix(".json")
                concepts = overlay_choices(saved)
                d["background"] = data_uri(event.result.image)
                note = (f"{event.result.image.width}×{event.result.image.height}, seed {one.seed}, in "
                        f"{event.seconds:.2f} s · {event.result.info['unet_passes_per_step']:.2f} UNet passes per "
                        f"step · saved as {saved.name}")
                yield {result: overlaid(saved, concepts, OVERLAY_KINDS), shown: str(saved),
                       overlay_concepts: gr.update(choices=concepts, value=concepts),
                       overlay_kinds: OVERLAY_KINDS, info: note, result_file: str(saved), preset_out: str(preset_path),
                       history: history_items(), canvas: canvas_for(d, size_value), draft: d,
                       cost: cost_sentence(state, method_value, d, steps_value, size_value)}

        generate_event = run.click(on_generate, [*form, batch, draft],
                                   [result, shown, overlay_concepts, overlay_kinds, info, result_file, preset_out,
                                    history, canvas, draft, cost], **PRIVATE, **DEVICE)
        stop_note = gr.Markdown(elem_classes="small-note", elem_id="stop-note")

        def on_stop(request: gr.Request):
            return state.stop(request.session_hash)

        # Stop ends this page's run (Gradio cancels only this session's event, and the run's own flag ends the
        # sampler within one step); it never waits in the device queue
        stop.click(on_stop, None, stop_note, api_name="stop", cancels=[generate_event], concurrency_limit=None,
                   concurrency_id="stop")

        def on_overlay(path, concepts, kinds):
            if not path or not Path(path).is_file():
                return gr.update()
            return overlaid(Path(path), concepts or [], kinds or [])

        for control in (overlay_concepts, overlay_kinds):
            control.input(on_overlay, [shown, overlay_concepts, overlay_kinds], result, **PRIVATE)

        # --- history --------------------------------------------------------------------------------------------

        def on_pick(evt: gr.SelectData):
            caption = evt.value.get("caption") if isinstance(evt.value, dict) else None
            picked_path = state.outputs / f"{Path(str(caption)).name}.png" if caption else None
            return str(picked_path) if picked_path is not None and picked_path.is_file() else None

        history.select(on_pick, None, picked, **QUICK)

        def on_use(path, d_version, p_version):
            if not path:
                raise gr.Error("Select an image in the history first.")
            restored = open_file(Path(path), d_version, p_version)
            concepts = overlay_choices(Path(path))
            return [*restored, overlaid(Path(path), concepts, OVERLAY_KINDS), path,
                    gr.update(choices=concepts, value=concepts), gr.Tabs(selected="compose")]

        use_history.click(on_use, [picked, cards_version, params_version],
                          [*restore_outputs, result, shown, overlay_concepts, tabs], **PRIVATE)
        refresh_history.click(history_items, None, history, **PRIVATE)

        # --- the model ------------------------------------------------------------------------------------------

        def on_load_model(choice, d, version, steps_value, method_value, progress=gr.Progress()):
            progress(0.1, desc=f"loading {choice or BUNDLED}")
            try:
                state.load_model(choice)
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            state.refresh_warnings(d)
            native_size = size_label(state.size, state.size)
            return (model_sentence(state),
                    gr.update(choices=family_sizes(state.family, state.size, state.pipe.vae_scale_factor),
                              value=native_size),
                    d, version + 1, canvas_for(d, native_size),
                    cost_sentence(state, method_value, d, steps_value, native_size))

        load_model.click(on_load_model, [model_choice, draft, cards_version, steps, method],
                         [model_note, size, draft, cards_version, canvas, cost], **PRIVATE, **DEVICE)

        # --- Break-for-Make -------------------------------------------------------------------------------------

        def on_assemble(content_label, style_label, finetune_steps, progress=gr.Progress(track_tqdm=True)):
            from studio.training.b4m import make

            files = state.lora_files()
            out = state.outputs / f"b4m-{uuid.uuid4().hex[:12]}.safetensors"
            try:
                if not content_label or not style_label:
                    raise StudioError("Choose a content adapter and a style adapter.")
                content_file, style_file = (files.get(label) or state.studio.library.find(label)
                                            for label in (content_label, style_label))
                with state.lock:
                    make(state.pipe, Path(content_file), Path(style_file), out, int(finetune_steps or 0))
            except (StudioError, OSError) as exc:
                return None, f"**Cannot assemble:** {exc}"
            tuned = f", fine-tuned jointly for {int(finetune_steps)} steps" if finetune_steps else ""
            return str(out), f"Assembled{tuned}: one ordinary LoRA with the content in the style."

        assemble_button.click(on_assemble, [content, style, finetune], [assembled, b4m_note], **PRIVATE, **DEVICE)

        demo.load(lambda d, m, st, si: (history_items(), cost_sentence(state, m, d, st, si), *fine_fields(d)),
                  [draft, method, steps, size], [history, cost, *fine_outputs], **PRIVATE)

        add_api(state)
    return demo


def step_description(event, index: int, images: int) -> str:
    """"image 1 of 2 · step 7 of 20 · about 4 s left"."""
    left = event.elapsed / event.step * (event.total - event.step) if event.step else None
    return (f"image {index + 1} of {images} · step {event.step} of {event.total}"
            + (f" · about {left:.0f} s left" if left is not None else ""))


def card_header(index: int, card: dict) -> str:
    """A LoRA card's title: its colour and name, what the file is, and a warning when it does not fit the model."""
    from html import escape

    warning = f"<div class='warning-note'>{escape(card['warning'])}</div>" if card["warning"] else ""
    return (f"<div class='lora-head' style='padding:4px 8px'><b style='color:{card['colour']}'>■ {index + 1}. "
            f"{escape(card['name'])}</b> <span class='small-note'>{escape(str(card['base_model']))} · "
            f"{escape(str(card['format']))} · rank {card['rank'] or '—'} · {card['short_hash'] or 'no hash'}</span>"
            f"{warning}</div>")


def recolour(draft: dict) -> None:
    """Colours follow the LoRAs' order (as the result's overlays do)."""
    for index, card in enumerate(draft["loras"]):
        card["colour"] = COLOURS[index % len(COLOURS)]


# --- the named API -----------------------------------------------------------------------------------------------

def composition_from_text(state: StudioState, text: str, seed=None) -> Composition:
    """A composition from preset JSON text or the name of an example preset, on this studio's model."""
    text = (text or "").strip()
    if text in example_presets():
        composition = load_preset(paths.EXAMPLE_PRESETS / f"{text}.json")
    else:
        composition = composition_from_json(text, "The composition (an example's name or composition JSON)")
    composition = composition.model_copy(update={"base_model": state.model_ref})
    return composition if seed is None or seed == "" else composition.with_overrides(seed=int(seed))


def add_api(state: StudioState) -> None:
    """The endpoints programs call (gradio_client): small, typed inputs, one sentence when refused."""
    with gr.Row(visible=False):
        api_composition = gr.Textbox(label="composition")
        api_seed = gr.Number(None, precision=0, label="seed")
        api_files = gr.File(file_count="multiple", label="loras")
        api_image = gr.Image(type="filepath", format="png")
        api_preset = gr.File()
        api_note = gr.Textbox()
        api_lora = gr.File(label="lora")
        api_preset_file = gr.File(label="preset_file")
        api_json = gr.JSON()
        api_button = gr.Button()

    def generate(composition: str, seed: int | None, loras: list | None, request: gr.Request,
                 progress=gr.Progress()):
        """Generate one image from a composition (preset JSON text, or an example preset's name); `loras`: LoRA
        files it names that the server's library lacks (added to it). Returns the PNG (with its composition), the
        preset and a note."""
        try:
            for file in loras or []:
                state.upload(file if isinstance(file, str) else file.name)
            result, saved, seconds = state.generate(
                composition_from_text(state, composition, seed), request.session_hash,
                on_step=lambda event: progress((event.step, event.total), desc=step_description(event, 0, 1)))
        except Cancelled as exc:
            return None, None, f"Stopped: {exc}"
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
        note = (f"{result.image.width}×{result.image.height} in {seconds:.2f} s · seed {result.seed} · "
                f"{result.info['unet_passes_per_step']:.2f} UNet passes per step")
        return str(saved), str(saved.with_suffix(".json")), note

    api_button.click(generate, [api_composition, api_seed, api_files], [api_image, api_preset, api_note],
                     api_name="generate", **DEVICE)

    def inspect_lora(lora: str) -> dict:
        """What a LoRA file is: format, base model, rank, trigger words, hashes; refused files say why."""
        from studio.lora import inspect_lora as inspect

        if not lora:
            raise gr.Error("Send a LoRA file.")
        try:
            data = inspect(Path(lora)).to_json(hashes=True)
        except (StudioError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        # the server's temporary copy means nothing to the caller (and a "path" key reads as a file to gradio_client)
        data.pop("path", None)
        return data

    api_button.click(inspect_lora, api_lora, api_json, api_name="inspect_lora", concurrency_limit=4)

    def methods() -> dict:
        """Every composition method: summary, cost, limits and its parameters' JSON schema."""
        return {name: {**composer.describe(), "schema": composer.Params.model_json_schema()}
                for name, composer in registry().items()}

    api_button.click(methods, None, api_json, api_name="methods", concurrency_limit=None)

    def open_preset(preset_file: str | None, text: str | None) -> dict:
        """A preset (.json), a PNG made by the studio, or preset JSON text / an example's name, as the composition
        JSON (validated; refused in one sentence)."""
        try:
            if preset_file:
                return load_preset(Path(preset_file)).model_dump(mode="json", exclude_none=True)
            return composition_from_text(state, text or "").model_dump(mode="json", exclude_none=True)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None

    api_button.click(open_preset, [api_preset_file, api_composition], api_json, api_name="open_preset",
                     concurrency_limit=4)


def main(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, config: str | None = None,
         open_browser: bool = False, prevent_thread_lock: bool = False, library: str | None = None,
         models: str | None = None, auth: str | None = None, limits=None, outputs: str | None = None):
    """Serve the studio. It listens on 127.0.0.1 unless `host` says otherwise; `auth` ("user:password", default
    $LORA_STUDIO_AUTH) makes every visitor log in (Gradio auth). Results go to `outputs` (default
    $LORA_STUDIO_OUTPUTS or ~/.local/share/lora-studio/outputs) and stay there."""
    credentials = parse_auth(auth if auth is not None else os.environ.get("LORA_STUDIO_AUTH"))
    if host not in LOCAL_HOSTS and credentials is None:
        print(f"warning: the studio listens on {host}:{port} without a password: anyone who can reach this machine "
              "can use it and its GPU. Share it safely with --auth USER:PASSWORD (or $LORA_STUDIO_AUTH), behind "
              "HTTPS, or keep 127.0.0.1 and reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 host).",
              file=sys.stderr, flush=True)
    state = StudioState(model, config, library, models, limits, outputs)
    demo = build_ui(state)
    demo.studio_state = state  # for Python callers (and tests) of a server started with prevent_thread_lock
    demo.queue(default_concurrency_limit=1, max_size=state.limits.max_queue)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, css=CSS, theme=gr.themes.Soft(),
                prevent_thread_lock=prevent_thread_lock, footer_links=["api", "gradio", "settings"],
                auth=credentials, max_file_size=state.limits.max_upload_bytes, allowed_paths=[str(state.outputs)])
    return demo


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise StudioError("--auth must be USER:PASSWORD, both non-empty.")
    return user, password
