"""The Python API: one `Studio` holds a loaded base model and the LoRAs it has read (kept in memory across calls,
least recently used dropped first when over a byte budget) and generates from a `Composition`, a preset or PNG
made by the studio, a dict, or an A1111-style prompt with `<lora:name:weight>` tags and `BREAK` regions.

    from studio import Studio, Composition
    studio = Studio.load()                                  # the bundled shapes-world model
    results = studio.generate("assets/presets/two-concepts.json", seeds=[1, 2])
    results[0].save("out/")

The CLI, the batch runner and the web studio are built on this object."""
from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from studio import paths
from studio.errors import LoraError, PresetError, StudioError
from studio.limits import Limits
from studio.spec import Composition, LoraEntry, Region, load_preset, parse_composition

DEFAULT_LORA_CACHE_BYTES = 2 << 30
REGION_KEYWORDS = re.compile(r"BREAK|ADDCOL|ADDROW|ADDCOMM|ADDBASE")  # Regional Prompter's region keywords
PRESET_SUFFIXES = (".json", ".png")


@dataclass
class Result:
    """One generated image with what explains it: each concept's attention map and mask (rows × cols in
    [0, 1]), the method's report (`info`), the time each phase took (`timings`, seconds) and the exact
    composition that made it (seed included)."""
    composition: Composition
    image: Image.Image
    maps: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    model_name: str = ""
    model_hash: str = ""

    @property
    def seed(self) -> int:
        return self.composition.seed

    def default_stem(self) -> str:
        return f"image-{self.composition.method}-{self.seed}"

    def portable_composition(self) -> dict:
        """The composition as the PNG stores it: LoRAs by file name and sha256 (found again through the library
        on another machine), painted masks embedded."""
        sha256s = [loaded["sha256"] for loaded in self.info.get("loras", {}).values()]
        return self.composition.portable(sha256s).model_dump(mode="json", exclude_none=True)

    def parameters(self) -> str:
        """The A1111 `parameters` text of this image."""
        from studio.outputs import a1111_infotext

        return a1111_infotext(self)

    def png_bytes(self) -> bytes:
        from studio.files import png_bytes
        from studio.generation import png_info

        return png_bytes(self.image, png_info(self.parameters(), self.portable_composition()))

    def save(self, out_dir: str | os.PathLike, stem: str | None = None, maps: bool = True) -> list[Path]:
        """Write `<stem>.png` (with its A1111 `parameters` and the composition inside) and, beside it, each
        concept's attention map and mask; every file atomically. Returns the paths, the image first."""
        from studio.outputs import write_result

        return write_result(self, Path(out_dir), stem or self.default_stem(), maps=maps)


class Results(list):
    """The results of one `generate` call, in seed order."""

    def save(self, out_dir: str | os.PathLike, stem: str | None = None) -> list[Path]:
        written = []
        for result in self:
            written += result.save(out_dir, f"{stem}-{result.composition.method}-{result.seed}" if stem else None)
        return written


class LoraCache:
    """LoRAs read from disk, kept by (path, size, mtime) and dropped least recently used first once their tensors
    take more than `max_bytes`; a file changed on disk is read again."""

    def __init__(self, max_bytes: int = DEFAULT_LORA_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    def get(self, path: str | os.PathLike):
        from studio.lora import load_lora

        path = Path(path).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError:
            raise LoraError(f"The LoRA file {path} does not exist.") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        weights = load_lora(path)
        size = sum(t.numel() * t.element_size() for module in weights.modules.values() for t in module.tensors())
        with self._lock:
            self.reads += 1
            self._items[key] = (weights, size)
            while len(self._items) > 1 and self.total_bytes > self.max_bytes:
                self._items.popitem(last=False)
        return weights

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class LoraLibrary:
    """Where LoRAs are found (the library folder, added folders, the bundled examples), the names given to files,
    and the cache of loaded LoRAs; turns presets, dicts and A1111 prompts into compositions whose files are
    paths on this machine. Needs no model, so a batch driver can expand a manifest without loading one."""

    def __init__(self, library: str | os.PathLike | None = None, extra_folders: Iterable = (),
                 cache_bytes: int = DEFAULT_LORA_CACHE_BYTES, confined: bool = False):
        self.library = library
        self.extra_folders = [Path(f) for f in extra_folders]
        self.cache = LoraCache(cache_bytes)
        self.named: dict[str, Path] = {}
        self.confined = confined  # True (the web studio): only files inside `folders` are ever opened

    @property
    def folders(self) -> list[Path]:
        """Where LoRAs are found by name: the library folder, any added folders, then the bundled examples."""
        from studio.lora import library_folder

        return [library_folder(self.library), *self.extra_folders, paths.EXAMPLE_LORAS, paths.EXAMPLE_B4M]

    def find(self, name: str, sha256: str | None = None) -> Path:
        """A LoRA by path, by a name given to `add`, or by file name (with or without suffix) in the library
        folders, A1111's way; with `sha256`, the file found must have it. A confined library takes paths only
        inside its folders and looks anything else up by file name in them."""
        from studio.lora.hashes import file_hashes
        from studio.lora.library import find_lora_file

        if name in self.named:
            return self.named[name]
        candidate = Path(name) if self.confined else Path(name).expanduser()  # a visitor's "~" is not ours
        if self.confined and (candidate.is_absolute() or len(candidate.parts) > 1):
            inside = self.inside(candidate)
            if inside is not None and inside.is_file():
                candidate = inside
            else:
                try:
                    return find_lora_file(candidate.name, self.folders, sha256)
                except LoraError:
                    raise LoraError(self.outside_sentence(f"The LoRA {name}")) from None
        elif self.confined:
            return find_lora_file(candidate.name, self.folders, sha256)
        if candidate.is_dir():
            raise LoraError(f"{candidate} is a folder, not a LoRA file.")
        if candidate.is_file() and (sha256 is None or file_hashes(candidate, None).sha256 == sha256.lower()):
            return candidate
        return find_lora_file(candidate.name, self.folders, sha256)

    def inside(self, path: str | os.PathLike) -> Path | None:
        """`path` (absolute, or relative to a folder) when it lies inside one of the folders, else None. Decided
        on the normalised text first, so that nothing outside is ever touched, then again with links resolved."""
        path = Path(path)
        for folder in self.folders:
            root = os.path.abspath(folder)
            joined = os.path.normpath(os.path.join(root, path))  # an absolute `path` replaces root here
            if os.path.commonpath([root, joined]) != root:
                continue
            try:
                real_root, real = os.path.realpath(root), os.path.realpath(joined)
            except (OSError, ValueError):  # e.g. a NUL byte in the name
                return None
            if os.path.commonpath([real_root, real]) == real_root:
                return Path(joined)
        return None

    def outside_sentence(self, what: str) -> str:
        folders = ", ".join(str(f) for f in self.folders)
        return (f"{what} is outside the studio's LoRA folders and no file of that name is in them; this studio "
                f"only opens files in its folders ({folders}); upload the file to add it.")

    def load(self, name_or_path: str | os.PathLike):
        return self.cache.get(self.find(str(name_or_path)))

    def add(self, path: str | os.PathLike, name: str | None = None):
        path = Path(path).expanduser().resolve()
        weights = self.cache.get(path)
        self.named[name or path.stem] = path
        return weights

    def entries(self):
        """Every LoRA-like file of the folders with its inspection (files it cannot use say why)."""
        from studio.lora import scan_library

        seen = set()
        for folder in self.folders:
            for entry in scan_library(folder):
                if entry.path.resolve() not in seen:
                    seen.add(entry.path.resolve())
                    yield entry

    # --- compositions -----------------------------------------------------------------------------------

    def composition(self, source: Composition | dict | str | os.PathLike, **overrides) -> Composition:
        """A validated Composition from a Composition, a dict, a preset or PNG path, or a prompt (A1111 syntax:
        `<lora:name:weight>` tags, `BREAK` between region prompts); `overrides` change its fields (e.g. method,
        steps, width, height, scheduler, seed, params). LoRA files are resolved through the library."""
        regions = overrides.pop("regions", None)
        if "sampler" in overrides:
            overrides["scheduler"] = overrides.pop("sampler")
        if isinstance(source, Composition):
            composition = source
        elif isinstance(source, dict):
            composition = parse_composition(source, "the composition")
        elif isinstance(source, Path) or (isinstance(source, str) and source.lower().endswith(PRESET_SUFFIXES)
                                          and "\n" not in source and Path(source).expanduser().is_file()):
            composition = load_preset(Path(source).expanduser())
        elif isinstance(source, str):
            composition = self.composition_from_prompt(source, regions=regions, method=overrides.get("method"))
        else:
            raise PresetError(f"Cannot make a composition from a {type(source).__name__}; give a Composition, a "
                              "dict, a preset path or a prompt.")
        composition = composition.with_overrides(**overrides)
        return self.resolve_files(composition)

    def composition_from_prompt(self, prompt: str, regions: str | None = None, method: str | None = None
                                ) -> Composition:
        """An A1111 prompt as a composition: `<lora:name:w>` tags become LoRAs (found by name in the library);
        with `BREAK` (or ADDCOL / ADDROW), each region prompt's LoRAs are concepts placed in that region, as
        Regional Prompter divides the image (`regions`: its divide ratios, e.g. "1,1" or "1,2;1,1"), and LoRAs
        outside every region are styles over the whole image."""
        from studio.a1111 import parse_lora_tags, split_regions

        if not REGION_KEYWORDS.search(prompt):
            text, tags = parse_lora_tags(prompt)
            loras = [self._entry_for_tag(tag, role="concept") for tag in tags]
            return Composition(prompt=text, loras=loras, method=method or "merge")
        layout = split_regions(prompt, ratios=regions)
        # the common part is in every region's prompt: its LoRAs are styles over the whole image
        common = parse_lora_tags(layout.common or "")[1]
        loras = [self._entry_for_tag(tag, role="style") for tag in common]
        common_tags = {tag.name for tag in common}
        region_texts = []
        for region in layout.regions:
            text, tags = parse_lora_tags(region.prompt)
            region_texts.append(text)
            for tag in (t for t in tags if t.name not in common_tags):
                loras.append(self._entry_for_tag(tag, role="concept", prompt=text, region=Region(box=region.box)))
        global_text = parse_lora_tags(layout.base)[0] if layout.base else ", ".join(t for t in region_texts if t)
        return Composition(prompt=global_text, loras=loras, method=method or "regional")

    def _entry_for_tag(self, tag, role: str, prompt: str | None = None, region: Region | None = None) -> LoraEntry:
        path = self.find(tag.name)
        info = self.cache.get(path).info
        te = None if tag.te_weight == tag.unet_weight else tag.te_weight
        return LoraEntry(file=str(path), weight=tag.unet_weight, text_encoder_weight=te, role=role,
                         trigger_words=list(info.trigger_words), prompt=prompt, region=region)

    def resolve_files(self, composition: Composition) -> Composition:
        """Each LoRA entry's file as a path on this machine: as given, else found by file name (and sha256) in the
        library folders, so that a PNG made on another machine opens here. A confined library refuses files and
        painted masks outside its folders."""
        loras = []
        for entry in composition.loras:
            path = self.find(entry.file, entry.sha256) if self.confined else self._local_file(entry)
            update: dict[str, Any] = {"file": str(path)}
            mask = entry.region.mask if entry.region is not None else None
            if self.confined and mask and not mask.startswith("data:"):
                inside = self.inside(mask)
                if inside is None:
                    raise PresetError(f"The mask of {path.name} is a file outside the studio's folders; here masks "
                                      "are embedded in the composition (a PNG made by the studio embeds them).")
                update["region"] = entry.region.model_copy(update={"mask": str(inside)})
            loras.append(entry.model_copy(update=update))
        return composition.model_copy(update={"loras": loras})

    def _local_file(self, entry: LoraEntry) -> Path:
        """An unconfined entry's file: its path as given, else found by name (and sha256) in the folders."""
        path = Path(entry.file).expanduser()
        if path.is_dir():
            raise LoraError(f"{path} is a folder, not a LoRA file.")
        if path.is_file():
            return path
        try:
            return self.find(path.name, entry.sha256)
        except LoraError:
            folders = ", ".join(str(f) for f in self.folders)
            known = f" (sha256 {entry.sha256[:12]}…)" if entry.sha256 else ""
            raise LoraError(f"The LoRA {path.name}{known} named in the composition is not in {path.parent} nor in "
                            f"the library folders ({folders}).") from None


class Studio:
    """A loaded base model and a LoRA library; `generate` runs compositions on it, one at a time (a lock
    serialises callers from several threads)."""

    def __init__(self, pipe, model_ref: str | None = None, library: str | os.PathLike | None = None,
                 lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES, lora_folders: Iterable = (),
                 limits: Limits | None = None):
        from studio.generation import default_size
        from studio.models import model_family

        self.pipe = pipe
        self.model_ref = model_ref
        self.family = model_family(pipe)
        self.size = default_size(pipe)
        self.library = library if isinstance(library, LoraLibrary) else LoraLibrary(library, lora_folders,
                                                                                    lora_cache_bytes)
        self.limits = limits if limits is not None else Limits.for_device(pipe.device.type)
        self._lock = threading.RLock()
        self._model_hash: str | None = None

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
             config: str | os.PathLike | None = None, library: str | os.PathLike | None = None,
             lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES, lora_folders: Iterable = (),
             models: str | os.PathLike | None = None, limits: Limits | None = None) -> "Studio":
        """Load a base model: None (the bundled shapes-world model), a diffusers folder, a single-file
        checkpoint (offline, from the configurations the studio ships) or a hub id; device and dtype default to
        the machine's best (CUDA fp16, else CPU fp32). `library` is the LoRA library folder (default
        $LORA_STUDIO_LORAS or ~/.cache/lora-studio/loras), or a LoraLibrary. `models`: an A1111 or ComfyUI
        install (or any folder of checkpoints): its LoRA folders join the library and `model` may name one of its
        checkpoints by file name. `limits`: what one request may ask (default: Limits.for_device, which reads
        the LORA_STUDIO_MAX_* variables)."""
        from studio.models import load_base_model

        found = model_folders(models)
        model = resolve_checkpoint(model, found)
        pipe = load_base_model(model, device=device, dtype=dtype, config=config)
        return cls(pipe, None if model is None else str(model), library, lora_cache_bytes,
                   [*lora_folders, *(found.lora_folders if found else [])], limits)

    def lora(self, name_or_path: str | os.PathLike):
        """The LoRA's weights (LoraWeights), read once and kept in memory across calls."""
        return self.library.load(name_or_path)

    def add_lora(self, path: str | os.PathLike, name: str | None = None):
        """Make a LoRA file known by `name` (default: its file stem) for prompts' `<lora:name>` tags and
        compositions, and read it now; returns its weights."""
        return self.library.add(path, name)

    def composition(self, source, **overrides) -> Composition:
        """See LoraLibrary.composition."""
        return self.library.composition(source, **overrides)

    # --- the model --------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """What A1111 writes as `Model`: the checkpoint's file stem, the folder's name or the hub id."""
        if self.model_ref is None:
            return paths.DEFAULT_MODEL.name
        path = Path(self.model_ref)
        return path.stem if path.is_file() else path.name if path.is_dir() else self.model_ref

    @property
    def model_hash(self) -> str:
        """A1111's `Model hash` (AutoV2: the first 10 hex digits of the checkpoint file's sha256). A diffusers
        folder (the bundled model included) has no single checkpoint file: its UNet weights file stands for it."""
        if self._model_hash is None:
            from studio.lora.hashes import file_hashes

            ref = Path(self.model_ref) if self.model_ref else paths.DEFAULT_MODEL
            if ref.is_dir():
                ref = next(iter(sorted((ref / "unet").glob("*.safetensors"))), None) if (ref / "unet").is_dir() else None
            self._model_hash = file_hashes(ref, None).model_hash if ref is not None and ref.is_file() else ""
        return self._model_hash

    # --- generating -------------------------------------------------------------------------------------

    def generate(self, source: Composition | dict | str | os.PathLike, seeds: Iterable[int] | str | None = None,
                 callback: Callable | None = None, **overrides) -> Results:
        """Generate one image per seed (default: the composition's own seed). `callback(step_info)` is called
        after every denoising step (return False to cancel). Returns Results; `results.save(dir)` writes them."""
        from studio.batch import parse_seeds

        composition = self.composition(source, **overrides)
        if isinstance(seeds, str):
            seeds = parse_seeds(seeds)
        seeds = [composition.seed] if seeds is None else [composition.seed if s is None else int(s) for s in seeds]
        self.check(composition, images=len(seeds))  # the seeds change nothing the check looks at
        return Results(self._run(composition.with_overrides(seed=seed), callback) for seed in seeds)

    def check(self, composition: Composition, images: int = 1) -> None:
        """Refuse (StudioError, one sentence) what cannot run or is over the limits, before any work starts."""
        from studio.compose import check_composition

        check_composition(self.pipe, composition, self.limits, images)

    def run(self, composition: Composition, callback: Callable | None = None) -> Result:
        """One composition, as given (files already resolved), one image."""
        self.check(composition)
        return self._run(composition, callback)

    def _run(self, composition: Composition, callback: Callable | None) -> Result:
        from studio.compose import compose, load_entries

        with self._lock:
            start = time.perf_counter()
            loaded = load_entries(composition, self.library.load)
            loras_done = time.perf_counter()
            composition = composition.model_copy(update={"base_model": self.model_ref})  # what it ran on
            outcome = compose(self.pipe, composition, callback=callback, loaded=loaded)
            end = time.perf_counter()
        return_freed_memory()
        timings = {"loras": loras_done - start, "sampling": outcome.info.get("seconds", end - loras_done),
                   "total": end - start}
        return Result(composition, outcome.image, outcome.maps, outcome.masks, outcome.info, timings,
                      self.model_name, self.model_hash)


def return_freed_memory() -> None:
    """Give the memory a run freed back to the system. glibc's allocator keeps freed blocks of a run's big
    temporary tensors in its arenas, so a long-running studio's resident memory creeps up by tens of MB an hour
    with nothing alive (`studio bench soak`); malloc_trim returns them. Elsewhere: nothing to do."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if os.name == "posix" else None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def model_folders(root: str | os.PathLike | None):
    """The checkpoints and LoRA folders of an A1111 / ComfyUI install or a plain folder (None: none)."""
    if root is None:
        return None
    from studio.checkpoints import find_models

    if not Path(root).expanduser().is_dir():
        raise StudioError(f"The models folder {root} does not exist.")
    return find_models(root)


def resolve_checkpoint(model: str | os.PathLike | None, found) -> str | os.PathLike | None:
    """`model` as given, or the checkpoint of the models folder whose file name (with or without suffix) it is."""
    if model is None or found is None or Path(model).expanduser().exists():
        return model
    for path in found.checkpoints:
        if str(model) in (path.name, path.stem):
            return str(path)
    names = ", ".join(p.stem for p in found.checkpoints) or "none"
    raise StudioError(f"No checkpoint named {model} in the models folder (it has: {names}).")


def studio_error_sentence(exc: BaseException) -> str:
    """One sentence for any failure of a run: StudioErrors as they are; out of memory and other errors named."""
    if isinstance(exc, StudioError):
        return str(exc)
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return f"The device ran out of memory ({text}); try a smaller size or fewer LoRAs."
    return f"The run failed with {type(exc).__name__}: {text}."
