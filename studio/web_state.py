"""What the web studio keeps on the server: the loaded model (swappable at runtime), the LoRA library's list
(cached, refreshed on demand), the outputs folder and its history, each browser session's run, and the draft of a
composition as the page edits it (`Draft`: LoRA cards, regions, method parameters) with its conversion to and from
a `Composition`."""
from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from studio.errors import Cancelled, StudioError
from studio.outputs import CONCEPT_COLOURS, mask_outline
from studio.spec import Composition, LoraEntry, Region, parse_composition

log = logging.getLogger(__name__)

COLOURS = ["#%02x%02x%02x" % rgb for rgb in CONCEPT_COLOURS]
BUNDLED = "bundled shapes-world"
PREVIEW_EVERY = 2  # steps between live previews
DISPLAY_MIN_PX = 512  # results smaller than this are shown enlarged (nearest neighbour)

# Each family's usual sizes (width, height): what its model was trained at and the common aspect ratios.
FAMILY_SIZES = {
    "shapes-world": [(64, 64), (96, 64), (64, 96), (128, 64), (64, 128)],
    "sd1": [(512, 512), (768, 512), (512, 768), (640, 512), (512, 640), (768, 768)],
    "sd2": [(768, 768), (512, 512), (768, 512), (512, 768), (1024, 768), (768, 1024)],
    "sdxl": [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)],
}


def default_outputs_folder() -> Path:
    """$LORA_STUDIO_OUTPUTS, else ~/.local/share/lora-studio/outputs: results stay across restarts."""
    env = os.environ.get("LORA_STUDIO_OUTPUTS")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "lora-studio" / "outputs"


def size_label(width: int, height: int) -> str:
    return f"{width}×{height}"


def parse_size(label: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[×x]\s*(\d+)\s*", str(label or ""))
    if not match:
        raise StudioError(f"The size {label!r} is not WIDTH×HEIGHT.")
    return int(match.group(1)), int(match.group(2))


def family_sizes(family: str, native: int, factor: int) -> list[str]:
    """The sizes offered for a model: its family's usual ones (the native square first), multiples of the latent
    factor only."""
    sizes = [(native, native)] + [s for s in FAMILY_SIZES.get(family, []) if s != (native, native)]
    return [size_label(w, h) for w, h in sizes if w % factor == 0 and h % factor == 0]


# --- the draft: a composition as the page edits it ----------------------------------------------------------

def lora_card(path: str, info, index: int, family: str | None) -> dict:
    """A new LoRA card for a library file: what the file says about itself, and whether it fits the model."""
    return {"file": str(path), "name": Path(path).stem, "colour": COLOURS[index % len(COLOURS)],
            "weight": 1.0, "role": "concept", "trigger_words": list(info.trigger_words) if info else [],
            "prompt": "", "region": None,
            "base_model": info.base_model if info else "unknown", "format": info.format if info else "—",
            "rank": info.rank if info else None,
            "short_hash": (info.short_hash or "") if info else "",
            "warning": fit_warning(info, family, Path(path).name)}


def made_for_another_base(info, family: str | None) -> bool:
    """Whether a LoRA's recorded base model is known and is not the loaded model's family."""
    return bool(info.base_model and family and info.base_model not in (family, "unknown"))


def fit_warning(info, family: str | None, name: str) -> str:
    if info is None:
        return f"{name} is not in the library."
    if made_for_another_base(info, family):
        return f"{name} is a LoRA for {info.base_model}, not for the loaded {family} model."
    return ""


def region_kind(region: dict | None) -> str:
    if not region:
        return "whole image"
    return "box" if region.get("box") else "painted mask" if region.get("mask") else "automatic"


def draft_composition(draft: dict, fields: dict) -> Composition:
    """The composition a draft and the form's fields describe (validated: one sentence when it is not)."""
    loras = []
    for card in draft["loras"]:
        region = card.get("region")
        loras.append(LoraEntry(file=card["file"], weight=card["weight"], role=card["role"],
                               trigger_words=card["trigger_words"], prompt=card.get("prompt") or None,
                               region=Region(**region) if region else None).model_dump(mode="json"))
    return parse_composition({**fields, "params": draft.get("params") or {}, "loras": loras}, "the studio")


def canvas_loras(draft: dict) -> list[dict]:
    """The canvas's view of the draft's LoRAs."""
    return [{"label": card["name"][:24], "colour": card["colour"],
             "box": list(card["region"]["box"]) if card.get("region") and card["region"].get("box") else None,
             "mask": card["region"]["mask"] if card.get("region") and card["region"].get("mask") else None}
            for card in draft["loras"]]


def apply_canvas(draft: dict, value: dict) -> None:
    """Take the canvas's boxes and painted masks into the draft (the cards it shows, in order)."""
    from studio.web_canvas import mask_is_empty

    for card, drawn in zip(draft["loras"], value.get("loras") or []):
        if drawn.get("box"):
            x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in drawn["box"])
            if x1 > x0 and y1 > y0:
                card["region"] = {"box": [x0, y0, x1, y1]}
        elif drawn.get("mask") and str(drawn["mask"]).startswith("data:image/png;base64,"):
            card["region"] = None if mask_is_empty(drawn["mask"]) else {"mask": drawn["mask"]}
        elif card.get("region") and not card["region"].get("auto"):
            card["region"] = None
    draft["active"] = int(value.get("active") or 0)


# --- one session's run ------------------------------------------------------------------------------------------

class SessionRun:
    """One session's current run: its Stop flag and how far it has come. Each run gets a flag of its own, so a
    stopped run still finishing its last step is not revived when the same session starts the next one."""

    def __init__(self):
        self.cancel = threading.Event()
        self.running = False
        self.step = 0
        self.total = 0

    def start(self, total: int) -> threading.Event:
        self.cancel = threading.Event()
        self.step, self.total, self.running = 0, total, True
        return self.cancel

    def finish(self, cancel: threading.Event) -> None:
        if cancel is self.cancel:  # a newer run of the session is still going
            self.running = False


@dataclass
class RunEvent:
    """What a run in its thread tells the page: a step done (with a preview now and then), the result, or the
    failure."""
    kind: str  # "step", "done", "failed"
    step: int = 0
    total: int = 0
    preview: Image.Image | None = None
    result: object = None
    error: BaseException | None = None
    seconds: float = 0.0
    elapsed: float = 0.0  # since sampling began


@dataclass
class Timing:
    """Seconds per UNet pass on this device, per pixel of image, from the last runs (a pass of one image at one
    size scales with its pixels)."""
    seconds_per_pass_pixel: float | None = None
    runs: list = field(default_factory=list)

    def record(self, seconds_per_step: float, passes: float, pixels: int) -> None:
        self.runs = (self.runs + [seconds_per_step / max(passes, 1.0) / pixels])[-8:]
        self.seconds_per_pass_pixel = float(np.median(self.runs))

    def expected_seconds(self, passes: float, steps: int, pixels: int) -> float | None:
        if self.seconds_per_pass_pixel is None:
            return None
        return self.seconds_per_pass_pixel * pixels * passes * steps


class StudioState:
    """The loaded base model and the LoRA files on offer; one per server process. Its library is confined: the
    server opens LoRA files (and painted masks) only inside the library folders, where uploads go. Each browser
    session (or gradio_client) has its own Stop. Results go to the outputs folder and stay there."""

    def __init__(self, model: str | None, config: str | None = None, library: str | None = None,
                 models: str | None = None, limits=None, outputs: str | os.PathLike | None = None):
        from studio.api import model_folders

        self.config = config
        self.library = library
        self.models = model_folders(models)
        self.models_root = models
        self.lock = threading.Lock()  # the device: one run (or model load) at a time
        self._load(model, limits)
        self.outputs = Path(outputs).expanduser() if outputs else default_outputs_folder()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, SessionRun] = {}
        self._sessions_lock = threading.Lock()
        self._lora_files: dict[str, str] | None = None

    def _load(self, model, limits=None) -> None:
        from studio.api import LoraLibrary, Studio

        lora_library = LoraLibrary(self.library, self.models.lora_folders if self.models else (), confined=True)
        studio = Studio.load(model, config=self.config, library=lora_library, models=self.models_root,
                             limits=limits if limits is not None else getattr(self, "limits", None))
        self.studio = studio
        self.model_ref = studio.model_ref
        self.pipe = studio.pipe
        self.family = studio.family
        self.size = studio.size
        self.limits = studio.limits
        self.timing = Timing()
        self.calibrate()

    def load_model(self, model: str | None) -> None:
        """Swap the base model (waits for the running generation); a model that cannot load leaves the current
        one in place."""
        model = None if not model or model == BUNDLED else model
        with self.lock:
            try:
                self._load(model)  # changes nothing until the model has loaded
            except Exception as exc:
                from studio.api import studio_error_sentence

                raise StudioError(f"The model {model} could not be loaded: "
                                  f"{studio_error_sentence(exc).rstrip('.')}; the previous model stays loaded."
                                  ) from None

    def calibrate(self) -> None:
        """Time one UNet pass with classifier-free guidance at the model's native size, so the page can tell the
        expected time of a run before any has run on this device. Instant on the bundled model; for larger models
        it runs in the background, holding the device like a run (a generation asked for meanwhile waits for it)."""
        def time_one_pass():
            try:
                self._time_one_pass()
            except Exception:  # noqa: BLE001 — only an estimate: the first run measures it anyway
                log.warning("timing one UNet pass failed", exc_info=True)

        if self.size <= 128:
            time_one_pass()
            return

        def in_background():
            with self.lock:
                time_one_pass()
                release_memory()

        threading.Thread(target=in_background, name="studio-calibrate", daemon=True).start()

    def _time_one_pass(self) -> None:
        import torch

        pipe, timing = self.pipe, self.timing
        unet = pipe.unet
        latent = self.size // pipe.vae_scale_factor
        options = {"device": pipe.device, "dtype": unet.dtype}
        sample = torch.randn(2, unet.config.in_channels, latent, latent, **options)
        dim = unet.config.cross_attention_dim
        context = torch.zeros(2, 77, dim if isinstance(dim, int) else dim[0], **options)
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            time_ids = unet.add_embedding.linear_1.in_features - pipe.text_encoder_2.config.projection_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, pipe.text_encoder_2.config.projection_dim,
                                                                      **options),
                                           "time_ids": torch.zeros(2, time_ids // unet.config.addition_time_embed_dim,
                                                                   **options)}}
        with torch.no_grad():
            if self.size <= 128:  # a warm-up pass costs nothing here; on large models the estimate can take it
                unet(sample, 10, context, **extra)
            start = time.perf_counter()
            unet(sample, 10, context, **extra)
            seconds = time.perf_counter() - start
        if timing.seconds_per_pass_pixel is None:  # a real run measured meanwhile is the better figure
            timing.record(seconds, 1.0, self.size * self.size)

    # --- sessions ---------------------------------------------------------------------------------------------

    def session(self, key: str | None) -> SessionRun:
        with self._sessions_lock:
            return self._sessions.setdefault(key or "anonymous", SessionRun())

    def stop(self, session_key: str | None) -> str:
        """Stop this session's run (only its own) at the end of the current step."""
        run = self.session(session_key)
        if not run.running:
            return "Nothing of yours is running."
        run.cancel.set()  # before reading the step: the run ends at most one step after the one reported
        return f"Stopped your run at step {run.step} of {run.total}."

    # --- the library -------------------------------------------------------------------------------------------

    @property
    def upload_folder(self) -> Path:
        from studio.lora import library_folder

        return library_folder(self.library) / "uploads"

    def library_entries(self):
        yield from self.studio.library.entries()

    def lora_files(self, refresh: bool = False) -> dict[str, str]:
        """Label -> path of every usable LoRA: read once, then again only when asked (`refresh`) or after an
        upload."""
        if self._lora_files is None or refresh:
            self._lora_files = {f"{Path(entry.path).stem} ({entry.info.base_model})": str(entry.path)
                                for entry in self.library_entries() if entry.usable}
        return self._lora_files

    def library_rows(self) -> list[list[str]]:
        rows = []
        for entry in self.library_entries():
            info = entry.info
            rows.append([entry.name, info.format if info else "—", info.base_model if info else "—",
                         str(info.rank) if info else "—", ", ".join(info.trigger_words) if info else "",
                         "usable" if entry.usable else entry.error])
        return rows

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
            if made_for_another_base(info, self.family):
                raise StudioError(f"The upload {name} is a LoRA for {info.base_model}, not for this studio's "
                                  f"{self.family} model.")
            target = self.upload_folder / name
            if target.exists() and file_hashes(target, None).sha256 != info.sha256:
                target = target.with_name(f"{target.stem}-{info.sha256[:8]}{target.suffix}")
            staging.replace(target)
        finally:
            staging.unlink(missing_ok=True)
        self._lora_files = None
        return target

    def new_card(self, path: str, index: int) -> dict:
        from studio.lora import inspect_lora

        try:
            info = inspect_lora(Path(path))
        except (StudioError, OSError):
            info = None
        return lora_card(path, info, index, self.family)

    def card_for_entry(self, entry: LoraEntry, index: int) -> dict:
        """A card for a LoRA of an opened preset or PNG: found in the library by path, name or sha256."""
        try:
            path = str(self.studio.library.resolve_files(
                Composition(prompt="", loras=[entry])).loras[0].file)
        except StudioError:
            path = entry.file
        card = self.new_card(path, index)
        region = entry.region.model_dump(exclude_none=True) if entry.region else None
        if region and region.get("mask") and not region["mask"].startswith("data:"):
            from attention.masks import mask_data_uri

            try:
                region["mask"] = mask_data_uri(region["mask"])
            except (StudioError, OSError):
                region = None
        if region and "auto" in region and not region["auto"]:
            region.pop("auto")
        card.update(weight=entry.weight, role=entry.role, trigger_words=list(entry.trigger_words),
                    prompt=entry.prompt or "", region=region)
        return card

    def draft_from(self, composition: Composition) -> dict:
        return {"loras": [self.card_for_entry(e, i) for i, e in enumerate(composition.loras)],
                "params": dict(composition.params), "active": 0}

    def refresh_warnings(self, draft: dict) -> None:
        from studio.lora import inspect_lora

        for card in draft["loras"]:
            try:
                info = inspect_lora(Path(card["file"]))
            except (StudioError, OSError):
                info = None
            card["warning"] = fit_warning(info, self.family, Path(card["file"]).name)

    # --- running ---------------------------------------------------------------------------------------------

    def admit(self, composition: Composition, images: int = 1) -> Composition:
        """The composition as it will run, or a StudioError before anything runs: LoRA files and masks only from
        the library folders, the method, its parameters and the limits (for `images` images) checked."""
        composition = self.studio.library.resolve_files(composition)
        self.studio.check(composition, images=images)
        return composition

    def run_events(self, composition: Composition, session_key: str | None, previews: bool = True):
        """Run one composition (as admitted) in a thread of its own and yield its RunEvents: one per step (with a
        preview every PREVIEW_EVERY steps when `previews`), then the "done" one. A failure is raised as a
        StudioError in one sentence (Cancelled when this session's Stop ended the run). Closing the generator
        before the end (the page went away, Gradio cancelled it) stops the run within a step. The device lock makes
        runs wait for each other."""
        from studio.api import studio_error_sentence

        run = self.session(session_key)
        cancel = run.start(composition.steps)
        events: queue.Queue = queue.Queue()

        def step_callback(step):
            if cancel is run.cancel:
                run.step = step.step + 1
            preview = None
            if previews and (step.step + 1) % PREVIEW_EVERY == 0 and step.step + 1 < step.total:
                preview = preview_image(self.pipe, step.latents)
            events.put(RunEvent("step", step.step + 1, step.total, preview, elapsed=step.elapsed))
            return not cancel.is_set()

        def work():
            try:
                with self.lock:
                    if cancel.is_set():
                        raise Cancelled("Stopped before it started.")
                    start = time.perf_counter()
                    result = self.studio.run(composition, step_callback)
                    seconds = time.perf_counter() - start
                self.timing.record(result.timings.get("sampling", seconds) / composition.steps,
                                   float(result.info.get("unet_passes_per_step", 1.0)),
                                   result.image.width * result.image.height)
                events.put(RunEvent("done", result=result, seconds=seconds))
            except BaseException as exc:  # noqa: BLE001 — reported as one sentence on the page
                if not isinstance(exc, StudioError):
                    log.exception("the run failed")
                    release_memory()
                events.put(RunEvent("failed", error=exc))
            finally:
                run.finish(cancel)

        threading.Thread(target=work, name="studio-run", daemon=True).start()
        finished = False
        try:
            while True:
                event = events.get()
                if event.kind == "step":
                    yield event
                    continue
                finished = True
                if event.kind == "failed":
                    if isinstance(event.error, StudioError):
                        raise event.error
                    raise StudioError(studio_error_sentence(event.error))
                yield event
                return
        finally:
            if not finished:
                cancel.set()

    def generate(self, composition: Composition, session_key: str | None, on_step=None):
        """One run from start to end, for a caller that waits (the API): admitted first (a StudioError before
        anything runs), then saved in the outputs folder. Returns (result, image path, seconds); a failure is a
        StudioError in one sentence (Cancelled when this session's Stop ended it)."""
        with closing(self.run_events(self.admit(composition), session_key, previews=False)) as events:
            for event in events:
                if event.kind == "step" and on_step is not None:
                    on_step(event)
        return event.result, self.save(event.result), event.seconds

    def save(self, result) -> Path:
        """The result in the outputs folder: the PNG with its composition, its preset (.json) and its maps and
        masks beside it. Returns the PNG's path."""
        from studio.spec import save_preset

        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{result.composition.method}-{result.seed}"
        image = result.save(self.outputs, stem)[0]
        save_preset(result.composition, image.with_suffix(".json"))
        return image

    def history(self, limit: int = 200) -> list[Path]:
        """The results in the outputs folder, newest first (their maps and masks are not listed)."""
        images = [p for p in self.outputs.glob("*.png") if not p.stem.endswith(("-map", "-mask"))]
        return sorted(images, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def release_memory() -> None:
    """After a failed run (out of memory above all): drop what the run held."""
    import gc

    import torch

    from studio.api import return_freed_memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_memory()


# --- pictures ------------------------------------------------------------------------------------------------

# A1111's "Approx cheap" latent → RGB projections (sd_samplers_common), for previews of large images
LATENT_RGB = {4: [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]}


def preview_image(pipe, latents) -> Image.Image:
    """What the image looks like so far: decoded by the VAE for small images, a linear projection of the latents
    for large ones (a full decode would cost about a step)."""
    import torch

    from studio.engine import decode

    if latents.shape[-1] * pipe.vae_scale_factor <= 256 or latents.shape[1] not in LATENT_RGB:
        with torch.no_grad():
            return decode(pipe, latents)
    weights = torch.tensor(LATENT_RGB[latents.shape[1]], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), weights)
    array = ((rgb + 1) * 127.5).clamp(0, 255).byte().numpy()
    return Image.fromarray(array).resize((array.shape[1] * pipe.vae_scale_factor,
                                          array.shape[0] * pipe.vae_scale_factor), Image.Resampling.BILINEAR)


def enlarged(image: Image.Image, minimum: int = DISPLAY_MIN_PX) -> Image.Image:
    """Small images enlarged by a whole factor with nearest neighbour (their pixels stay sharp)."""
    factor = max(1, -(-minimum // max(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor),
                                                  Image.Resampling.NEAREST)


def concept_layers(image_path: Path) -> dict[str, dict[str, Path]]:
    """The attention map and mask files written beside a result: concept name -> {"map": path, "mask": path}."""
    layers: dict[str, dict[str, Path]] = {}
    stem = image_path.stem
    for kind in ("map", "mask"):
        for path in image_path.parent.glob(f"{glob_escape(stem)}-*-{kind}.png"):
            name = path.stem[len(stem) + 1:-len(kind) - 1]
            layers.setdefault(name, {})[kind] = path
    return dict(sorted(layers.items(), key=lambda item: concept_index(item[0])))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def concept_index(name: str) -> int:
    """The LoRA's index in the composition from its adapter name (`l<index>_<stem>`)."""
    match = re.match(r"l(\d+)_", name)
    return int(match.group(1)) if match else 0


def concept_label(name: str) -> str:
    match = re.match(r"l(\d+)_(.*)", name)
    return f"{int(match.group(1)) + 1}: {match.group(2)}" if match else name


def overlaid(image_path: Path, shown: list[str], kinds: list[str]) -> Image.Image:
    """The result enlarged, with the chosen concepts' attention maps (filled, in the concept's colour) and masks
    (outlined) laid over it."""
    with Image.open(image_path) as opened:
        image = enlarged(opened.convert("RGB"))
    base = np.asarray(image, np.float32)
    out = base.copy()
    for name, files in concept_layers(image_path).items():
        if concept_label(name) not in shown:
            continue
        colour = np.asarray(CONCEPT_COLOURS[concept_index(name) % len(CONCEPT_COLOURS)], np.float32)
        if "attention" in kinds and "map" in files:
            with Image.open(files["map"]) as m:
                weight = np.asarray(m.convert("L").resize(image.size, Image.Resampling.NEAREST), np.float32)
            weight = weight[..., None] / 255.0 * 0.65
            out = out * (1 - weight) + colour * weight
        if "mask" in kinds and "mask" in files:
            with Image.open(files["mask"]) as m:
                mask = np.asarray(m.convert("L").resize(image.size, Image.Resampling.NEAREST)) > 127
            out[mask_outline(mask, width=2)] = colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))
