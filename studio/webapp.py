"""The web studio (Gradio): `studio serve`, or `python app.py`."""
from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from composers import registry
from studio import paths
from studio.errors import Cancelled, StudioError
from studio.samplers import SAMPLERS
from studio.spec import LoraEntry, Region, load_preset, parse_composition, save_preset

N_SLOTS = 4
MODEL_DEFAULT = "model default"
BOX_COLOURS = ["#e4572e", "#2e86ab", "#76b041", "#f3a712"]
CSS = """
#title {margin-bottom: 0}
.small-note {font-size: 0.85em; opacity: 0.8}
#result img {min-width: 320px; image-rendering: pixelated}
#maps img {image-rendering: pixelated}
"""


class StudioState:
    """The loaded base model and the LoRA files on offer; one per server process."""

    def __init__(self, model: str | None, config: str | None = None, library: str | None = None,
                 models: str | None = None):
        from studio.api import Studio, model_folders

        self.models = model_folders(models)
        self.studio = Studio.load(model, config=config, library=library, models=models)
        self.model_ref = self.studio.model_ref
        self.pipe = self.studio.pipe
        self.family = self.studio.family
        self.size = self.studio.size
        self.library = library
        self.outputs = Path(tempfile.mkdtemp(prefix="lora-studio-"))
        self.lock = threading.Lock()
        self.cancel = threading.Event()

    def library_entries(self):
        """Every LoRA-like file on offer: the bundled examples (LoRAs and the B4M pair) and the library."""
        yield from self.studio.library.entries()

    def lora_files(self) -> dict[str, str]:
        """Label -> path of every usable LoRA."""
        return {f"{Path(entry.path).stem} ({entry.info.base_model})": str(entry.path)
                for entry in self.library_entries() if entry.usable}

    def library_rows(self) -> list[list[str]]:
        rows = []
        for entry in self.library_entries():
            info = entry.info
            rows.append([entry.name, info.format if info else "—", info.base_model if info else "—",
                         str(info.rank) if info else "—", ", ".join(info.trigger_words) if info else "",
                         "usable" if entry.usable else entry.error])
        return rows


def example_presets() -> list[str]:
    """The bundled presets (assets/presets), by name."""
    return sorted(p.stem for p in paths.EXAMPLE_PRESETS.glob("*.json"))


def layout_preview(size: int, slots: list[dict]) -> Image.Image:
    """The canvas with each placed concept's box, so a designer sees the layout before generating."""
    scale = max(1, 256 // size)
    canvas = Image.new("RGB", (size * scale, size * scale), "#f4f4f4")
    draw = ImageDraw.Draw(canvas)
    for i, slot in enumerate(slots):
        if slot["use_box"]:
            x0, y0, x1, y1 = (v * size * scale for v in slot["box"])
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOURS[i], width=3 if slot["file"] else 1)
            label = Path(str(slot["file"])).stem[:24] if slot["file"] else "(no file)"
            draw.text((x0 + 4, y0 + 2), f"LoRA {i + 1}: {label}", fill=BOX_COLOURS[i])
    return canvas


def slot_values(flat: list) -> list[dict]:
    """The flat Gradio inputs of the LoRA slots, 10 per slot, as dicts."""
    slots = []
    for i in range(N_SLOTS):
        file, weight, role, triggers, use_box, x0, y0, x1, y1, prompt = flat[i * 10:(i + 1) * 10]
        slots.append({"file": file, "weight": weight, "role": role, "triggers": triggers, "use_box": use_box,
                      "box": (x0, y0, x1, y1), "prompt": prompt})
    return slots


def composition_from_ui(state: StudioState, prompt, negative, method, params_json, steps, guidance, seed, sampler,
                        flat):
    files = state.lora_files()
    loras = []
    for slot in slot_values(flat):
        if not slot["file"]:
            continue
        region = Region(box=tuple(slot["box"])) if slot["use_box"] else None
        loras.append(LoraEntry(file=files.get(slot["file"], slot["file"]), weight=slot["weight"], role=slot["role"],
                               trigger_words=[w.strip() for w in slot["triggers"].split(",") if w.strip()],
                               region=region, prompt=slot["prompt"] or None))
    try:
        params = json.loads(params_json or "{}")
    except json.JSONDecodeError as exc:
        raise StudioError(f"The method parameters are not valid JSON ({exc.msg}).") from None
    return parse_composition({"base_model": state.model_ref, "prompt": prompt, "negative_prompt": negative,
                              "steps": int(steps), "guidance": float(guidance), "seed": int(seed), "method": method,
                              "scheduler": None if sampler == MODEL_DEFAULT else sampler,
                              "params": params, "loras": [e.model_dump(mode="json") for e in loras]}, "the studio")


def method_defaults(method: str) -> str:
    described = registry()[method].describe()
    return json.dumps({name: spec["default"] for name, spec in described["params"].items()}, indent=1)


def build_ui(state: StudioState) -> gr.Blocks:
    methods = list(registry())
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio", elem_id="title")
        gr.Markdown(f"Base model: **{state.model_ref or 'bundled shapes-world'}** ({state.family}, "
                    f"{state.size}×{state.size} px, {state.pipe.device}, "
                    f"{str(state.pipe.dtype).replace('torch.', '')})", elem_classes="small-note")
        with gr.Tab("Compose"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=2, value="a large solid red circle on the left and a "
                                                                      "large solid blue square on the right, white "
                                                                      "background")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        method = gr.Dropdown(methods, value="regional", label="Method")
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        sampler = gr.Dropdown([MODEL_DEFAULT, *SAMPLERS], value=MODEL_DEFAULT,
                                              label="Sampler")
                    method_note = gr.Markdown(registry()["regional"].summary, elem_classes="small-note")
                    with gr.Accordion("Method parameters (JSON)", open=False):
                        params = gr.Code(method_defaults("regional"), language="json", label="Parameters")
                    slot_inputs = []
                    choices = list(state.lora_files())
                    for i in range(N_SLOTS):
                        with gr.Accordion(f"LoRA {i + 1}", open=i < 2):
                            with gr.Row():
                                file = gr.Dropdown(choices, value=None, label="File", allow_custom_value=True)
                                weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight")
                                role = gr.Radio(["concept", "style"], value="concept", label="Role")
                            triggers = gr.Textbox(label="Trigger words (comma separated)")
                            use_box = gr.Checkbox(value=i < 2, label="Place in a box (relative coordinates)")
                            with gr.Row():
                                x0 = gr.Slider(0, 1, value=0.0 if i % 2 == 0 else 0.5, step=0.01, label="x0")
                                y0 = gr.Slider(0, 1, value=0.0, step=0.01, label="y0")
                                x1 = gr.Slider(0, 1, value=0.5 if i % 2 == 0 else 1.0, step=0.01, label="x1")
                                y1 = gr.Slider(0, 1, value=1.0, step=0.01, label="y1")
                            region_prompt = gr.Textbox(label="Region prompt (default: the prompt)")
                            slot_inputs += [file, weight, role, triggers, use_box, x0, y0, x1, y1, region_prompt]
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary")
                        stop = gr.Button("Cancel")
                    with gr.Row():
                        example = gr.Dropdown(example_presets(), value=None, label="Example presets",
                                              elem_id="examples")
                        preset_in = gr.File(label="Open a preset (.json, or a PNG made here)", file_types=[".json", ".png"])
                        preset_out = gr.File(label="Preset of the last image")
                with gr.Column(scale=2):
                    layout = gr.Image(label="Layout", type="pil", format="png", height=256, interactive=False)
                    image = gr.Image(label="Result", type="filepath", format="png", height=384, elem_id="result")
                    maps = gr.Gallery(label="Attention maps and masks", columns=4, height=200, format="png",
                                      elem_id="maps")
                    info = gr.Markdown(elem_classes="small-note")

        with gr.Tab("Library"):
            gr.Markdown("Every LoRA file the studio found, with what it is; files it cannot use say why.",
                        elem_classes="small-note")
            table = gr.Dataframe(headers=["name", "format", "base", "rank", "trigger words", "status"],
                                 value=state.library_rows(), interactive=False, wrap=True)
            gr.Button("Rescan").click(lambda: state.library_rows(), outputs=table)
            if state.models is not None:
                gr.Markdown(f"**Checkpoints** of the models folder ({state.models.kind}; start the studio with "
                            "`--model NAME` to use one): " + (", ".join(f"`{p.stem}`" for p in
                                                                      state.models.checkpoints) or "none"),
                            elem_classes="small-note")

        with gr.Tab("Break-for-Make"):
            gr.Markdown("Assemble a B4M **content** adapter and a B4M **style** adapter trained from the same "
                        "seed into one LoRA. Two ordinary LoRAs cannot be assembled: their internal bases are "
                        "arbitrary, so the halves would not fit together.", elem_classes="small-note")
            with gr.Row():
                content = gr.Dropdown(choices, label="Content adapter", allow_custom_value=True)
                style = gr.Dropdown(choices, label="Style adapter", allow_custom_value=True)
                finetune = gr.Number(0, label="Joint fine-tune steps (0: assembly alone; official: 1000)",
                                     minimum=0, maximum=5000, precision=0)
            assemble_button = gr.Button("Assemble")
            assembled = gr.File(label="Assembled LoRA")
            b4m_note = gr.Markdown()

        def on_method(name):
            return registry()[name].summary + f" UNet passes per step: {registry()[name].passes_doc}.", \
                method_defaults(name)

        method.change(on_method, method, [method_note, params])

        def on_layout(*flat):
            return layout_preview(state.size, slot_values(list(flat)))

        for component in slot_inputs:
            component.change(on_layout, slot_inputs, layout)
        demo.load(on_layout, slot_inputs, layout)

        def on_file(label):
            from studio.lora import inspect_lora

            path = state.lora_files().get(label)
            if not path:
                return gr.update()
            return ", ".join(inspect_lora(path).trigger_words)

        for i in range(N_SLOTS):
            slot_inputs[i * 10].change(on_file, slot_inputs[i * 10], slot_inputs[i * 10 + 3])

        def on_generate(prompt_text, negative_text, method_name, params_json, n_steps, cfg, seed_value, sampler_name,
                        *flat, progress=gr.Progress()):
            try:
                composition = composition_from_ui(state, prompt_text, negative_text, method_name, params_json,
                                                  n_steps, cfg, seed_value, sampler_name, list(flat))
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            state.cancel.clear()

            def step_callback(step):
                progress((step.step + 1, step.total), desc=f"{composition.method}: denoising")
                return not state.cancel.is_set()

            with state.lock:
                start = time.perf_counter()
                try:
                    result = state.studio.run(state.studio.library.resolve_files(composition), step_callback)
                except Cancelled as exc:
                    return gr.update(), gr.update(), gr.update(), str(exc)
                except StudioError as exc:
                    raise gr.Error(str(exc)) from None
                elapsed = time.perf_counter() - start
            written = result.save(state.outputs, f"{int(time.time() * 1000)}-{composition.method}-{composition.seed}")
            preset_path = written[0].with_suffix(".json")
            save_preset(result.composition, preset_path)
            gallery = [(str(p), p.stem.rsplit("-", 2)[-2] + " " + p.stem.rsplit("-", 1)[-1]) for p in written[1:]]
            note = (f"{result.image.size[0]}×{result.image.size[1]} in {elapsed:.2f} s · seed {composition.seed} · "
                    f"{result.info['unet_passes_per_step']:.2f} UNet passes per step")
            return str(written[0]), gallery, str(preset_path), note

        run.click(on_generate, [prompt, negative, method, params, steps, guidance, seed, sampler] + slot_inputs,
                  [image, maps, preset_out, info])
        stop.click(lambda: state.cancel.set(), None, None)

        def on_preset(file):
            if file is None:
                return [gr.update()] * (8 + len(slot_inputs))
            try:
                composition = load_preset(Path(file))
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            files = {v: k for k, v in state.lora_files().items()}
            values = [composition.prompt, composition.negative_prompt, composition.method,
                      json.dumps(composition.params or json.loads(method_defaults(composition.method)), indent=1),
                      composition.steps, composition.guidance, composition.seed,
                      composition.scheduler or MODEL_DEFAULT]
            for i in range(N_SLOTS):
                if i < len(composition.loras):
                    e = composition.loras[i]
                    box = e.region.box if e.region and e.region.box else (0, 0, 1, 1)
                    values += [files.get(e.file, e.file), e.weight, e.role, ", ".join(e.trigger_words),
                               e.region is not None, *box, e.prompt or ""]
                else:
                    values += [None, 1.0, "concept", "", False, 0, 0, 1, 1, ""]
            return values

        preset_in.change(on_preset, preset_in, [prompt, negative, method, params, steps, guidance, seed, sampler]
                         + slot_inputs)
        example.change(lambda name: on_preset(paths.EXAMPLE_PRESETS / f"{name}.json" if name else None), example,
                       [prompt, negative, method, params, steps, guidance, seed, sampler] + slot_inputs)

        def on_assemble(content_label, style_label, finetune_steps, progress=gr.Progress(track_tqdm=True)):
            from studio.training.b4m import make

            files = state.lora_files()
            out = state.outputs / f"b4m-{int(time.time())}.safetensors"
            try:
                with state.lock:
                    make(state.pipe, Path(files.get(content_label, content_label or "")),
                         Path(files.get(style_label, style_label or "")), out, int(finetune_steps or 0))
            except (StudioError, OSError) as exc:
                return None, f"**Cannot assemble:** {exc}"
            tuned = f", fine-tuned jointly for {int(finetune_steps)} steps" if finetune_steps else ""
            return str(out), f"Assembled{tuned}: one ordinary LoRA with the content in the style."

        assemble_button.click(on_assemble, [content, style, finetune], [assembled, b4m_note])
    return demo


def main(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, config: str | None = None,
         open_browser: bool = False, prevent_thread_lock: bool = False, library: str | None = None,
         models: str | None = None):
    state = StudioState(model, config, library, models)
    demo = build_ui(state)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, css=CSS, theme=gr.themes.Soft(),
                prevent_thread_lock=prevent_thread_lock, footer_links=["gradio", "settings"])
    return demo
