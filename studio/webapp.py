"""The web studio (Gradio): `studio serve`, or `python app.py`."""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from composers import registry
from studio import paths
from studio.errors import Cancelled, StudioError
from studio.samplers import SAMPLERS
from studio.spec import LoraEntry, Region, load_preset, parse_composition, save_preset

log = logging.getLogger(__name__)

N_SLOTS = 4
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MODEL_DEFAULT = "model default"
BOX_COLOURS = ["#e4572e", "#2e86ab", "#76b041", "#f3a712"]
CSS = """
#title {margin-bottom: 0}
.small-note {font-size: 0.85em; opacity: 0.8}
#result img {min-width: 320px; image-rendering: pixelated}
#maps img {image-rendering: pixelated}
"""


class StudioState:
    """The loaded base model and the LoRA files on offer; one per server process. Its library is confined: the
    server opens LoRA files (and painted masks) only inside the library folders, where uploads go. Each browser
    session (or gradio_client) has its own Stop."""

    def __init__(self, model: str | None, config: str | None = None, library: str | None = None,
                 models: str | None = None, limits=None):
        from studio.api import LoraLibrary, Studio, model_folders

        self.models = model_folders(models)
        lora_library = LoraLibrary(library, self.models.lora_folders if self.models else (), confined=True)
        self.studio = Studio.load(model, config=config, library=lora_library, models=models, limits=limits)
        self.model_ref = self.studio.model_ref
        self.pipe = self.studio.pipe
        self.family = self.studio.family
        self.size = self.studio.size
        self.library = library
        self.limits = self.studio.limits
        self.outputs = Path(tempfile.mkdtemp(prefix="lora-studio-"))
        self.lock = threading.Lock()
        self._sessions: dict[str, SessionRun] = {}
        self._sessions_lock = threading.Lock()

    def session(self, key: str | None) -> "SessionRun":
        """The run state of one browser session (or gradio_client), made on first use."""
        with self._sessions_lock:
            return self._sessions.setdefault(key or "anonymous", SessionRun())

    @property
    def upload_folder(self) -> Path:
        from studio.lora import library_folder

        return library_folder(self.library) / "uploads"

    def generate(self, composition, session_key: str | None, progress=None) -> tuple[str, list, str, str]:
        """Run one composition for a session: checked against the limits and the library before anything runs;
        returns (image path, gallery of maps and masks, preset path, note). A failure of any kind is one sentence
        (gr.Error) and leaves the pipeline as it was."""
        from studio.api import studio_error_sentence

        try:
            composition = self.admit(composition)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
        run = self.session(session_key)
        run.start(composition.steps)

        def step_callback(step):
            run.step = step.step + 1
            if progress is not None:
                progress((step.step + 1, step.total), desc=f"{composition.method}: denoising")
            return not run.cancel.is_set()

        try:
            with self.lock:
                start = time.perf_counter()
                result = self.studio.run(composition, step_callback)
                elapsed = time.perf_counter() - start
        except Cancelled as exc:
            return None, [], None, str(exc)
        except Exception as exc:  # noqa: BLE001 — out of memory and the like: one sentence, then a normal studio
            if not isinstance(exc, StudioError):
                log.exception("the run failed")
                release_memory()
            raise gr.Error(studio_error_sentence(exc)) from None
        finally:
            run.finish()
        stem = f"{uuid.uuid4().hex[:12]}-{composition.method}-{composition.seed}"
        written = result.save(self.outputs, stem)
        preset_path = written[0].with_suffix(".json")
        save_preset(result.composition, preset_path)
        gallery = [(str(p), p.stem.rsplit("-", 2)[-2] + " " + p.stem.rsplit("-", 1)[-1]) for p in written[1:]]
        note = (f"{result.image.size[0]}×{result.image.size[1]} in {elapsed:.2f} s · seed {composition.seed} · "
                f"{result.info['unet_passes_per_step']:.2f} UNet passes per step")
        return str(written[0]), gallery, str(preset_path), note

    def admit(self, composition):
        """The composition as it will run, or a StudioError before anything runs: LoRA files and masks only from
        the library folders, the method, its parameters and the limits checked."""
        composition = self.studio.library.resolve_files(composition)
        self.studio.check(composition)
        return composition

    def stop(self, session_key: str | None) -> str:
        """Stop this session's run (only its own) at the end of the current step."""
        run = self.session(session_key)
        if not run.running:
            return "Nothing of yours is running."
        run.cancel.set()  # before reading the step: the run ends at most one step after the one reported
        return f"Stopping your run (step {run.step} of {run.total})."

    def upload(self, file_path: str, name: str | None = None) -> Path:
        """Add an uploaded LoRA to the library's uploads folder: size within the limit, .safetensors only (a
        pickle never), inspected before it is kept; returns where it went."""
        from studio.lora import inspect_lora
        from studio.lora.hashes import file_hashes

        source = Path(file_path)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name or source.name).name).strip("._") or "upload.safetensors"
        if not name.lower().endswith(".safetensors"):
            raise StudioError(f"The upload {name} is not a .safetensors file; only safetensors LoRAs are accepted "
                              "(pickled .pt/.ckpt/.bin files can execute code).")
        self.limits.check_upload(name, source.stat().st_size)
        staging = self.upload_folder / ".staging" / f"{uuid.uuid4().hex}-{name}"  # a unique name: never half-seen
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging)
        try:
            info = inspect_lora(staging)
            if info.base_model and self.family and info.base_model not in (self.family, "unknown"):
                raise StudioError(f"The upload {name} is a LoRA for {info.base_model}, not for this studio's "
                                  f"{self.family} model.")
            target = self.upload_folder / name
            if target.exists() and file_hashes(target, None).sha256 != info.sha256:
                target = target.with_name(f"{target.stem}-{info.sha256[:8]}{target.suffix}")
            staging.replace(target)
        finally:
            staging.unlink(missing_ok=True)
        return target

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


class SessionRun:
    """One session's current run: its Stop flag and how far it has come."""

    def __init__(self):
        self.cancel = threading.Event()
        self.running = False
        self.step = 0
        self.total = 0

    def start(self, total: int) -> None:
        self.cancel.clear()
        self.step, self.total, self.running = 0, total, True

    def finish(self) -> None:
        self.running = False


def release_memory() -> None:
    """After a failed run (out of memory above all): drop what the run held."""
    import gc

    import torch

    from studio.api import return_freed_memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_memory()


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


def composition_from_text(state: StudioState, text: str, seed=None):
    """A composition from preset JSON text or the name of an example preset, on this studio's model."""
    from studio.spec import composition_from_json

    text = (text or "").strip()
    if text in example_presets():
        composition = load_preset(paths.EXAMPLE_PRESETS / f"{text}.json")
    else:
        composition = composition_from_json(text, "The preset (an example's name or composition JSON)")
    composition = composition.model_copy(update={"base_model": state.model_ref})
    return composition if seed is None or seed == "" else composition.with_overrides(seed=int(seed))


FORM_FIELDS = ["prompt", "negative_prompt", "method", "params", "steps", "guidance", "seed", "sampler"]
SLOT_FIELDS = ["file", "weight", "role", "trigger_words", "use_box", "x0", "y0", "x1", "y1", "region_prompt"]


def form_signature() -> inspect.Signature:
    """(prompt, …, lora1_file, …, lora4_region_prompt, request, progress): the generate event's parameters."""
    names = FORM_FIELDS + [f"lora{i + 1}_{name}" for i in range(N_SLOTS) for name in SLOT_FIELDS]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(name, kind) for name in names]
                             + [inspect.Parameter("request", kind, annotation=gr.Request),
                                inspect.Parameter("progress", kind, default=gr.Progress())])


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
            upload = gr.File(label=f"Add LoRA files (.safetensors, up to {state.limits.max_upload_bytes / 2**20:.0f} "
                                   f"MiB each; kept in {state.upload_folder})", file_count="multiple",
                             file_types=[".safetensors"])
            upload_note = gr.Markdown(elem_classes="small-note")
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

        def on_generate(*values):
            *fields, request, progress = values
            try:
                composition = composition_from_ui(state, *fields[:8], list(fields[8:]))
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            image_path, gallery, preset_path, note = state.generate(composition, request.session_hash, progress)
            if image_path is None:  # cancelled: keep the last image on screen
                return gr.update(), gr.update(), gr.update(), note
            return image_path, gallery, preset_path, note

        # Gradio passes the request only to a parameter it can see: give the 48 inputs names (gradio_client shows
        # them) and the request and progress after them
        on_generate.__signature__ = form_signature()
        on_generate.__annotations__ = {"request": gr.Request}
        run.click(on_generate, [prompt, negative, method, params, steps, guidance, seed, sampler] + slot_inputs,
                  [image, maps, preset_out, info], api_name="generate")
        stop_note = gr.Markdown(elem_classes="small-note")

        def on_stop(request: gr.Request):
            return state.stop(request.session_hash)

        # Stop runs beside the queue (never waits behind a generation) and only touches its own session's run
        stop.click(on_stop, None, stop_note, api_name="stop", concurrency_limit=None, concurrency_id="stop")

        with gr.Row(visible=False):  # the `compose` endpoint, for gradio_client: a preset in, an image out
            api_preset = gr.Textbox()
            api_seed = gr.Number(precision=0)
            api_image = gr.Image(type="filepath", format="png")
            api_preset_out = gr.File()
            api_note = gr.Textbox()
            api_button = gr.Button()

        def on_compose(preset_text, seed_value, request: gr.Request, progress=gr.Progress()):
            """Generate from a composition given as preset JSON text, or the name of an example preset."""
            try:
                composition = composition_from_text(state, preset_text, seed_value)
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            image_path, _, preset_path, note = state.generate(composition, request.session_hash, progress)
            return image_path, preset_path, note

        api_button.click(on_compose, [api_preset, api_seed], [api_image, api_preset_out, api_note], api_name="compose")

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
        def on_example(name):
            if name and name not in example_presets():  # a client may send any text: only the examples are read
                raise gr.Error(f"There is no example preset named {name!r}.")
            return on_preset(paths.EXAMPLE_PRESETS / f"{name}.json" if name else None)

        example.change(on_example, example, [prompt, negative, method, params, steps, guidance, seed, sampler]
                       + slot_inputs)

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

        assemble_button.click(on_assemble, [content, style, finetune], [assembled, b4m_note])

        lora_dropdowns = [slot_inputs[i * 10] for i in range(N_SLOTS)] + [content, style]

        def on_upload(files):
            notes = []
            for file in files or []:
                path = file if isinstance(file, str) else file.name
                try:
                    kept = state.upload(path)
                    notes.append(f"Added **{kept.name}**.")
                except (StudioError, OSError) as exc:
                    notes.append(f"**Refused:** {exc}")
            choices = list(state.lora_files())
            return (state.library_rows(), " ".join(notes), *[gr.update(choices=choices) for _ in lora_dropdowns])

        upload.upload(on_upload, upload, [table, upload_note, *lora_dropdowns], api_name="upload_loras")
    return demo


def main(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, config: str | None = None,
         open_browser: bool = False, prevent_thread_lock: bool = False, library: str | None = None,
         models: str | None = None, auth: str | None = None, limits=None):
    """Serve the studio. It listens on 127.0.0.1 unless `host` says otherwise; `auth` ("user:password", default
    $LORA_STUDIO_AUTH) makes every visitor log in (Gradio auth)."""
    credentials = parse_auth(auth if auth is not None else os.environ.get("LORA_STUDIO_AUTH"))
    if host not in LOCAL_HOSTS and credentials is None:
        print(f"warning: the studio listens on {host}:{port} without a password: anyone who can reach this machine "
              "can use it and its GPU. Share it safely with --auth USER:PASSWORD (or $LORA_STUDIO_AUTH), behind "
              "HTTPS, or keep 127.0.0.1 and reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 host).",
              file=sys.stderr, flush=True)
    state = StudioState(model, config, library, models, limits)
    demo = build_ui(state)
    demo.studio_state = state  # for Python callers (and tests) of a server started with prevent_thread_lock
    demo.queue(default_concurrency_limit=1, max_size=state.limits.max_queue)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, css=CSS, theme=gr.themes.Soft(),
                prevent_thread_lock=prevent_thread_lock, footer_links=["gradio", "settings"], auth=credentials,
                max_file_size=state.limits.max_upload_bytes)
    return demo


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise StudioError("--auth must be USER:PASSWORD, both non-empty.")
    return user, password
