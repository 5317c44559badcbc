"""Batches: a manifest (JSON or CSV) of presets, inline compositions or A1111 prompts × seeds × overrides, run on
this machine or on a Ray cluster (studio/distributed.py) with the same outputs.

Every output is written atomically, the image last; `index.json` (also atomic) records each item by the hash of
its composition, seed included, so re-running the same command skips what is done, retries what failed and
resumes an interrupted batch with nothing redone and nothing lost."""
from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from studio.errors import PresetError, StudioError
from studio.spec import Composition, describe_validation_error

INDEX = "index.json"
COMPOSITION_COLUMNS = ("method", "steps", "guidance", "width", "height", "scheduler", "negative_prompt",
                       "decor_strength")


def parse_seeds(text: str | None) -> list[int | None]:
    """"0-3" → [0, 1, 2, 3]; "1,5,9" → [1, 5, 9]; None → the compositions' own seeds."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return [None]
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [int(s) for s in text]
    seeds = []
    for part in str(text).split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise StudioError(f"Seeds {text!r} are not like 0-3 or 1,5,9.")
        seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return seeds


class ManifestItem(BaseModel):
    """One line of a manifest: exactly one of `preset` (a .json or a studio PNG, relative to the manifest),
    `composition` (inline) or `prompt` (A1111 syntax); its own seeds and overrides, else the manifest's."""
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    preset: Optional[str] = None
    composition: Optional[dict[str, Any]] = None
    prompt: Optional[str] = None
    regions: Optional[str] = None
    seeds: Optional[Union[str, int, list[int]]] = None
    overrides: Optional[list[dict[str, Any]]] = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seeds: Optional[Union[str, int, list[int]]] = None
    overrides: list[dict[str, Any]] = [{}]
    items: list[ManifestItem]


@dataclass
class BatchItem:
    """One image to make: its composition (files resolved, seed set), the output stem and the key that
    identifies it across runs."""
    composition: Composition
    stem: str
    key: str
    source: str

    def to_json(self) -> dict:
        return {"composition": self.composition.model_dump(mode="json"), "stem": self.stem, "key": self.key,
                "source": self.source}


def read_manifest(path: Path) -> Manifest:
    """A manifest file: JSON ({"seeds", "overrides", "items": [...]}, or a list of items) or CSV (columns `name`,
    `preset` or `prompt`, `regions`, `seeds`, and composition fields as overrides: method, steps, …, `params` as
    JSON)."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"The manifest {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PresetError(f"The manifest {path.name} is not UTF-8 text.") from None
    if path.suffix.lower() == ".csv":
        data = {"items": [_csv_item(row, path, n) for n, row in enumerate(csv.DictReader(text.splitlines()), 2)]}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetError(f"The manifest {path.name} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        if isinstance(data, list):
            data = {"items": data}
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise PresetError(describe_validation_error(exc, f"The manifest {path.name}")) from None


def _csv_item(row: dict, path: Path, line: int) -> dict:
    row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
    unknown = set(row) - {"name", "preset", "prompt", "regions", "seeds", "params", *COMPOSITION_COLUMNS}
    if unknown:
        raise PresetError(f"The manifest {path.name} has an unknown column {sorted(unknown)[0]!r}.")
    item: dict[str, Any] = {k: row[k] for k in ("name", "preset", "prompt", "regions", "seeds") if row.get(k)}
    override: dict[str, Any] = {k: row[k] for k in COMPOSITION_COLUMNS if row.get(k)}
    if row.get("params"):
        try:
            override["params"] = json.loads(row["params"])
        except json.JSONDecodeError:
            raise PresetError(f"The manifest {path.name}, line {line}: `params` is not valid JSON.") from None
    if override:
        item["overrides"] = [override]
    return item


def expand_manifest(manifest: Manifest, base: Path, library, limits=None) -> list[BatchItem]:
    """Every (item × override × seed) as a BatchItem, compositions validated (method, parameters, regions,
    `limits`) and files resolved before anything runs; a bad item stops the batch here, named, with nothing
    generated."""
    from studio.compose import check_composition

    items, stems = [], {}
    for index, item in enumerate(manifest.items, 1):
        given = [k for k in ("preset", "composition", "prompt") if getattr(item, k) is not None]
        if len(given) != 1:
            raise PresetError(f"Manifest item {index} needs exactly one of `preset`, `composition` or `prompt`.")
        if item.preset is not None:
            preset = Path(item.preset).expanduser()
            source: Any = preset if preset.is_absolute() else base / preset
            label, name = str(item.preset), item.name or Path(item.preset).stem
        elif item.composition is not None:
            source, label, name = item.composition, f"item {index}", item.name or f"item{index}"
        else:
            source, label, name = item.prompt, f"item {index}", item.name or f"item{index}"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or f"item{index}"
        for override in item.overrides or manifest.overrides:
            extra = {"regions": item.regions} if item.regions else {}
            try:
                composition = library.composition(source, **extra, **override)
                check_composition(None, composition, limits)
            except StudioError as exc:
                raise PresetError(f"Manifest item {index} ({label}): {exc}") from None
            for seed in parse_seeds(item.seeds if item.seeds is not None else manifest.seeds):
                run = composition.with_overrides(seed=seed)
                key = composition_key(run)
                stem = f"{name}-{run.method}-{run.seed}"
                if stems.setdefault(stem, key) != key:  # same name, another composition: keep both
                    stem = f"{stem}-{key[:8]}"
                stems[stem] = key
                items.append(BatchItem(run, stem, key, label))
    unique = {item.key: item for item in items}
    return list(unique.values())


def composition_key(composition: Composition) -> str:
    """The hash of a composition as it runs, LoRAs by content (sha256) rather than by path, so that the key is
    the same on every machine and survives moving the library."""
    return composition.portable().digest()[:20]


@dataclass
class BatchReport:
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| done | skipped | failed |", "|---:|---:|---:|",
                 f"| {len(self.done)} | {len(self.skipped)} | {len(self.failed)} |"]
        for record in self.failed:
            lines.append(f"failed: {record['stem']}: {record['error']}")
        return "\n".join(lines)


class BatchIndex:
    """`index.json` in the output folder: key -> record, rewritten atomically after every item."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / INDEX
        try:
            self.records: dict[str, dict] = json.loads(self.path.read_text()).get("items", {})
        except (OSError, ValueError, AttributeError):
            self.records = {}

    def finished(self, item: BatchItem) -> bool:
        record = self.records.get(item.key)
        return bool(record and record.get("status") == "done"
                    and (self.path.parent / record["image"]).is_file())

    def record(self, item: BatchItem, **fields) -> dict:
        from studio.files import write_text_atomic

        record = {"key": item.key, "stem": item.stem, "source": item.source, "seed": item.composition.seed,
                  "method": item.composition.method, **fields}
        self.records[item.key] = record
        write_text_atomic(self.path, json.dumps({"items": self.records}, indent=1))
        return record


def run_items(items: list[BatchItem], out_dir: Path, execute: Callable[[list[BatchItem]], Iterable[tuple]],
              progress: bool = True) -> BatchReport:
    """Run the items not yet done through `execute` (an engine: yields (item, files, seconds) or (item, error)),
    recording each in the index as it finishes, with a progress bar of counts and time left."""
    from tqdm.auto import tqdm

    from studio.files import remove_partial_files
    from studio.outputs import write_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out_dir)
    index = BatchIndex(out_dir)
    report = BatchReport()
    todo = []
    for item in items:
        if index.finished(item):
            report.skipped.append(index.records[item.key])
        else:
            todo.append(item)
    bar = tqdm(total=len(todo), desc="batch", unit="image", disable=not progress)
    bar.set_postfix(done=0, skipped=len(report.skipped), failed=0)
    try:
        for outcome in execute(todo):
            item = outcome[0]
            if len(outcome) == 3:
                _, files, seconds = outcome
                write_files(out_dir, files)
                names = list(files)
                report.done.append(index.record(item, status="done", image=names[0], files=names[1:],
                                                seconds=round(seconds, 3)))
            else:
                report.failed.append(index.record(item, status="failed", error=outcome[1]))
            bar.update(1)
            bar.set_postfix(done=len(report.done), skipped=len(report.skipped), failed=len(report.failed))
    finally:
        bar.close()
    return report


def local_engine(studio_for: Callable[[str | None], Any]) -> Callable[[list[BatchItem]], Iterable[tuple]]:
    """Run items one after another in this process, each on the Studio of its base model (`studio_for(ref)`); any
    failure of one item (out of memory included) is reported for that item and the batch goes on."""
    from studio.api import studio_error_sentence
    from studio.outputs import result_files

    def execute(items: list[BatchItem]):
        for item in items:
            start = time.perf_counter()
            try:
                result = studio_for(item.composition.base_model).run(item.composition)
                files = result_files(result, item.stem)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 — one item's failure must not stop the batch
                _free_device_memory()
                yield item, studio_error_sentence(exc)
                continue
            yield item, files, time.perf_counter() - start

    return execute


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_manifests(paths: list[Path], seeds: str | None = None, method: str | None = None) -> Manifest:
    """One manifest from manifests and presets given on the command line (preset paths made absolute); `seeds`
    for items that name none, `method` over every item."""
    items = []
    for path in map(Path, paths):
        if _is_manifest(path):
            manifest = read_manifest(path)
            for item in manifest.items:
                update = {}
                if item.preset is not None and not Path(item.preset).expanduser().is_absolute():
                    update["preset"] = str((path.parent / item.preset).resolve())
                if item.seeds is None and manifest.seeds is not None:
                    update["seeds"] = manifest.seeds
                if item.overrides is None and manifest.overrides != [{}]:
                    update["overrides"] = manifest.overrides
                items.append(item.model_copy(update=update))
        else:
            if not path.is_file():
                raise PresetError(f"The preset {path} does not exist.")
            items.append(ManifestItem(preset=str(path.resolve())))
    if method is not None:
        items = [item.model_copy(update={"overrides": [{**o, "method": method} for o in item.overrides or [{}]]})
                 for item in items]
    return Manifest(seeds=seeds, items=items)


def _is_manifest(path: Path) -> bool:
    if path.suffix.lower() == ".csv":
        return True
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return True  # read_manifest names the problem
    return isinstance(data, list) or (isinstance(data, dict) and "items" in data)


def run_batch(manifest: Manifest | Path, out_dir: Path, model: str | None = None, library: str | None = None,
              engine: str = "local", address: str | None = None, workers: int | None = None,
              progress: bool = True, studio=None, models: str | Path | None = None, limits=None) -> BatchReport:
    """Validate and expand a manifest (relative presets from the current folder, or the manifest file's), then run
    it with the local engine or on Ray."""
    from studio.api import LoraLibrary, model_folders, resolve_checkpoint

    found = model_folders(models)
    model = resolve_checkpoint(model, found)
    if not isinstance(manifest, Manifest):
        manifest = load_manifests([Path(manifest)])
    if engine not in ("local", "ray"):
        raise StudioError(f"Unknown engine {engine!r}; choose local or ray.")
    lora_library = studio.library if studio is not None else LoraLibrary(library, found.lora_folders if found else ())
    if limits is None:
        from studio.limits import Limits

        limits = studio.limits if studio is not None else Limits.for_device()
    items = expand_manifest(manifest, Path.cwd(), lora_library, limits)
    if model is not None or studio is not None:  # one model for every item
        items = [BatchItem(i.composition.model_copy(update={"base_model": model if studio is None else
                                                             studio.model_ref}), i.stem, i.key, i.source)
                 for i in items]
    if engine == "ray":
        from studio.distributed import ray_engine

        models = {item.composition.base_model for item in items}
        if len(models) > 1:
            raise StudioError(f"The Ray engine runs one base model and the items name {len(models)}; give --model.")
        with ray_engine(next(iter(models), None), library, address=address, workers=workers,
                        limits=limits.model_dump()) as execute:
            return run_items(items, out_dir, execute, progress)
    from studio.api import Studio

    studios = {} if studio is None else {studio.model_ref: studio}

    def studio_for(ref: str | None):
        if ref not in studios:
            studios[ref] = Studio.load(ref, library=lora_library, limits=limits)
        return studios[ref]

    return run_items(items, out_dir, local_engine(studio_for), progress)
