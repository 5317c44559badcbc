"""The Ray engine of `studio batch --engine ray`: one actor per GPU (or per CPU worker) holds a warm Studio; the
LoRA files a batch needs go into Ray's object store once and each actor writes them to its own cache once; the
driver hands out one item at a time per actor, writes every result itself (so the files are byte-identical to
the local engine's) and gives a dead actor's item to a fresh actor."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from studio.errors import StudioError

MAX_ATTEMPTS = 3  # an item whose worker died is retried on a fresh worker up to this many times in all
FAIL_ONCE_ENV = "LORA_STUDIO_RAY_TEST_FAIL_ONCE"  # tests: a marker path; the first worker to see it absent dies


class StudioWorker:
    """A Ray actor: a Studio loaded once, LoRAs materialised from the object store into a cache folder."""

    def __init__(self, model: str | None, library: str | None, threads: int, limits: dict | None = None):
        import torch

        from studio.api import Studio
        from studio.limits import Limits

        torch.set_num_threads(threads)  # CPU results depend on the thread count: the driver's, as the local engine
        self.studio = Studio.load(model, library=library, limits=Limits(**limits) if limits else None)
        self.cache = Path(tempfile.mkdtemp(prefix="lora-studio-ray-"))
        self.files: dict[str, Path] = {}

    def ready(self) -> str:
        return f"{os.getpid()}"

    def run(self, composition_json: dict, stem: str, lora_files: dict) -> tuple:
        """(files, seconds) or (error sentence,). `lora_files`: sha256 -> (file name, object ref in a list)."""
        from studio.api import studio_error_sentence
        from studio.outputs import result_files
        from studio.spec import parse_composition

        marker = os.environ.get(FAIL_ONCE_ENV)
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)
        start = time.perf_counter()
        try:
            composition = parse_composition(composition_json, "the batch item")
            loras = [entry.model_copy(update={"file": str(self._materialise(entry.sha256, lora_files))})
                     for entry in composition.loras]
            result = self.studio.run(composition.model_copy(update={"loras": loras}))
            return result_files(result, stem), time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 — reported for this item; the worker stays usable
            return (studio_error_sentence(exc),)

    def _materialise(self, sha256: str, lora_files: dict) -> Path:
        import ray

        if sha256 not in self.files:
            name, (ref,) = lora_files[sha256]
            path = self.cache / sha256 / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ray.get(ref))
            self.files[sha256] = path
        return self.files[sha256]


def shipped_composition(composition) -> tuple[dict, dict[str, tuple[str, Path]]]:
    """The composition as workers receive it (LoRAs by file name + sha256, painted masks embedded) and the
    files it needs, sha256 -> (name, path on this machine)."""
    portable = composition.portable()
    needed = {shipped.sha256: (shipped.file, Path(entry.file)) for entry, shipped in zip(composition.loras,
                                                                                       portable.loras)}
    return portable.model_dump(mode="json"), needed


@contextlib.contextmanager
def ray_engine(model: str | None, library: str | None, address: str | None = None, workers: int | None = None,
               limits: dict | None = None):
    """An engine (see studio.batch.run_items) over a Ray cluster: `address` None starts a local Ray instance
    (or joins the one this process already started); "auto" or "ray://host:10001" joins a cluster. `limits`: the
    driver's Limits (as a dict), which the workers apply too."""
    try:
        import ray
    except ImportError:
        raise StudioError("The Ray engine needs Ray: pip install 'ray>=2.60,<2.61'.") from None
    from studio.api import studio_error_sentence

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        size = workers or (gpus if gpus else max(1, cpus))
        worker_class = ray.remote(**per_actor)(StudioWorker)

        import torch

        threads = torch.get_num_threads()

        def new_actor():
            return worker_class.remote(model, library, threads, limits)

        def execute(items):
            if not items:
                return
            shipped, refs = {}, {}
            for item in items:
                composition, needed = shipped_composition(item.composition)
                shipped[item.key] = composition
                for sha256, (name, path) in needed.items():
                    if sha256 not in refs:
                        refs[sha256] = (name, [ray.put(path.read_bytes())])  # wrapped: passed as a reference
            actors = [new_actor() for _ in range(min(size, len(items)))]
            try:
                ray.get([actor.ready.remote() for actor in actors])
            except ray.exceptions.RayError as exc:
                raise StudioError(f"The Ray workers could not load the model ({studio_error_sentence(exc)})") from None
            queue = list(items)
            attempts = {item.key: 0 for item in items}
            running = {}

            def submit(actor):
                item = queue.pop(0)
                attempts[item.key] += 1
                task = actor.run.remote(shipped[item.key], item.stem, {s: refs[s] for s in
                                                                     shipped_needs(shipped[item.key])})
                running[task] = (actor, item)

            for actor in actors:
                if queue:
                    submit(actor)
            while running:
                [task], _ = ray.wait(list(running), num_returns=1)
                actor, item = running.pop(task)
                try:
                    outcome = ray.get(task)
                except ray.exceptions.RayActorError:
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    actor = new_actor()
                    actors.append(actor)
                    if attempts[item.key] < MAX_ATTEMPTS:
                        queue.insert(0, item)
                    else:
                        yield item, f"The Ray worker died {MAX_ATTEMPTS} times running this item."
                else:
                    yield (item, *outcome)
                if queue:
                    submit(actor)
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)

        yield execute
    finally:
        if started:
            ray.shutdown()


def shipped_needs(composition_json: dict) -> list[str]:
    return [entry["sha256"] for entry in composition_json.get("loras", [])]
