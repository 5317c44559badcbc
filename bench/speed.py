"""Speed and memory of every composition method against one LoRA, and against the method run the way its
official code runs it (bench/speed_references.py), all measured in one run.

Per row: seconds per denoising step (the median of the measured steps after one warm-up step) and peak memory
until the last step (resident-memory growth on CPU, sampled every 5 ms; torch.cuda.max_memory_allocated on GPU;
the VAE decoding after it, the same for every method, is run and reported on the baselines' rows only), each as a ratio to one LoRA on the same
model in the same run. The machine's speed drifts by several per cent over minutes, so one LoRA is timed again
before each group of N and each row's ratio is to the one-LoRA run nearest before it. Guided methods are timed on
guided steps (the costly ones; every step of a 20-step run may be one); CLoRA's whole-generation ratio adds its
2 × 19 repeated guidance iterations of the default schedule, timed in the same run. Then, beyond one image: the time from `studio serve`
and from `Studio.load()` to a first image, and `studio inspect` / the library scan on 500 LoRA files.

Usage: studio bench speed [--quick] [--models sd15,sdxl] [--ns 2,4,8] [--size 256] [--steps 3] [--no-startup]
Writes bench/results/speed.json, speed.md and speed.png (`--out` to write elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # speed_references beside this file

N_METHODS = ["merge", "regional", "lora_composer", "clora", "switch", "composite"]
PAIR_METHODS = ["k_lora", "b4m"]  # one content and one style: N = 2 only
OFFICIAL = ["regional", "lora_composer", "clora", "composite"]
# official references measured up to this N, to keep the run within 30 minutes on 2 CPU cores: CLoRA's and
# composite's official cost grows with N exactly as ours does (same passes), regional's and LoRA-Composer's do not
OFFICIAL_MAX_N = {"clora": 2, "composite": 2}
# On a CPU, SDXL (2.6 B parameters) runs only LoRA-Composer the official way (SD1.5 shows every method's), and the
# diffusers + PEFT peer runs on SD1.5 only: the whole run stays within 30 minutes on 2 cores. On a GPU: all of them.
OFFICIAL_ON_CPU = {"sdxl": ["lora_composer"]}
PEER_ON_CPU = {"sd15", "shapes"}
SUBJECTS = ["dog", "cat", "bird", "car", "tree", "house", "boat", "horse"]
TRIGGERS = ["sks", "ohwx", "zwx", "pqv", "xjy", "qwf", "vbn", "mkl"]
BASES = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "shapes": "shapes_world_v1"}
# the model's rows; SDXL, 2.5 B parameters, only at N = 2 on a CPU
DEFAULT_NS = {"sd15": [2, 4, 8], "sdxl": [2], "shapes": [2, 4, 8]}
LATENT_TOLERANCE = 1e-3  # same maths: max |Δ latent| / max |latent| between our run and the reference's


# --- measuring ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory a block adds: resident memory sampled every 2 ms on CPU (after freed memory is returned to the
    system), torch's own peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        from studio.api import return_freed_memory

        return_freed_memory()
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.high = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.high = max(self.high, self.process.memory_info().rss)

    def so_far(self) -> int:
        """The peak until now."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return max(self.high, self.process.memory_info().rss) - self.base

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.high, self.process.memory_info().rss) - self.base
        return False


def measure(pipe, composition, method_context=None, decode: bool = True) -> dict:
    """Run a composition, timing each step; with `method_context` (a context manager) the method runs inside it.
    `decode=False` skips the VAE decoding after the last step (the same for every method, seconds on a CPU): the
    baselines' rows report it, the others' stop at the latents."""
    from unittest import mock

    from PIL import Image

    from studio.compose import compose

    stamps, denoising_peak = [], []
    device = pipe.unet.device

    def tick(info):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if info.step == info.total - 1:
            denoising_peak.append(memory.so_far())

    skip_decoding = nullcontext() if decode else mock.patch("studio.engine.decode",
                                                            lambda _pipe, _latents: Image.new("RGB", (8, 8)))
    with (method_context or nullcontext()), skip_decoding, PeakMemory(device) as memory, torch.no_grad():
        start = time.perf_counter()  # (guidance enables its own gradients)
        result = compose(pipe, composition, callback=tick)
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return {"steps": steps, "peak": denoising_peak[0], "peak_with_decoding": memory.peak if decode else None,
            "latents": result.latents.float().cpu(), "passes": result.info.get("unet_passes_per_step")}


# --- the compositions ---------------------------------------------------------------------------------------
def boxes(n: int) -> list[tuple[float, float, float, float]]:
    """n boxes tiling the image: columns of up to 4, two rows when n > 4."""
    rows = 1 if n <= 4 else 2
    cols = -(-n // rows)
    return [((k % cols) / cols, (k // cols) / rows, (k % cols + 1) / cols, (k // cols + 1) / rows) for k in range(n)]


def scene(n: int, trigger_for: int | None = None) -> str:
    words = [f"a {TRIGGERS[k]} {SUBJECTS[k]}" if k == trigger_for else f"a {SUBJECTS[k]}" for k in range(n)]
    return "a photo of " + " and ".join(words)


def composition_for(method: str, n: int, files: list[Path], pair: dict, size: int, steps: int):
    from studio.spec import Composition, LoraEntry, Region

    base = Composition(prompt=scene(n), width=size, height=size, guidance=7.0, steps=steps + 1, seed=0,
                       method=method)
    if method == "plain":
        return base.model_copy(update={"method": "merge"})
    if method == "one_lora":
        return base.model_copy(update={"method": "merge", "loras": [LoraEntry(file=str(files[0]))]})
    if method == "k_lora":
        return base.model_copy(update={"loras": [LoraEntry(file=str(files[0])),
                                                 LoraEntry(file=str(files[1]), role="style")]})
    if method == "b4m":
        return base.model_copy(update={"loras": [LoraEntry(file=str(pair["content"])),
                                                 LoraEntry(file=str(pair["style"]), role="style")]})
    if method == "clora":
        # one extra step whose guidance runs twice: its extra time is one guidance iteration
        entries = [LoraEntry(file=str(files[k]), trigger_words=[TRIGGERS[k]], prompt=scene(n, k)) for k in range(n)]
        return base.model_copy(update={"steps": steps + 2, "loras": entries,
                                       "params": {"subjects": SUBJECTS[:n], "inner_steps": [1], "inner_iters": 2}})
    entries = [LoraEntry(file=str(files[k]), trigger_words=[TRIGGERS[k]], region=Region(box=box),
                         prompt=f"a photo of a {TRIGGERS[k]} {SUBJECTS[k]}")
               for k, box in enumerate(boxes(n))]
    return base.model_copy(update={"loras": entries})


def timed_steps(method: str, steps: list[float]) -> tuple[float, float | None]:
    """(seconds per step, one guidance iteration or None) from a run's step times (step 0 is the warm-up)."""
    if method == "clora":
        per_step = statistics.median(steps[2:])
        return per_step, max(steps[1] - per_step, 0.0)
    return statistics.median(steps[1:]), None


# --- models and files -----------------------------------------------------------------------------------------
def build_pipe(model: str, device: str, dtype: torch.dtype):
    from studio.architectures import random_sd15_pipeline, random_sdxl_pipeline
    from studio.models import load_base_model

    if model == "shapes":
        pipe = load_base_model()
    else:
        pipe = (random_sd15_pipeline if model == "sd15" else random_sdxl_pipeline)(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def write_files(pipe, model: str, folder: Path, n: int) -> tuple[list[Path], dict]:
    from studio.lora.synthetic import write_random_lora
    from studio.training.plp import create_plp_adapter, save_plp_adapter

    files = [write_random_lora(folder / f"{model}-{k}.safetensors", pipe, BASES[model], rank=8, seed=k + 1,
                               trigger=TRIGGERS[k]) for k in range(n)]
    pair = {}
    for role, seed in (("content", 1), ("style", 2)):
        factors = create_plp_adapter(pipe.unet, rank=8, seed=7)
        gen = torch.Generator().manual_seed(seed)
        for f in factors.values():  # untrained adapters are zero in B and D: give them values, as training would
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.01)
            f.D.copy_(torch.randn(f.D.shape, generator=gen) * 0.01)
        pair[role] = save_plp_adapter(folder / f"{model}-b4m-{role}.safetensors", factors, role, 7,
                                      extra={"ss_base_model_version": BASES[model]})
    return files, pair


# --- one model's table ------------------------------------------------------------------------------------------
def measure_diffusers(pipe, files: list[Path], size: int, steps: int) -> dict:
    """The peer's floor: plain diffusers with PEFT, `load_lora_weights` + `set_adapters` (all LoRAs merged into every
    layer's forward), the pipeline's own loop; latents out (no decoding), the adapters unloaded afterwards."""
    names = [f"peer{k}" for k in range(len(files))]
    stamps, device = [], pipe.unet.device

    def tick(_pipe, _step, _t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    try:
        for name, file in zip(names, files):
            pipe.load_lora_weights(str(file), adapter_name=name)
        pipe.set_adapters(names, [1.0] * len(names))
        injected = sum(1 for m in pipe.unet.modules() if hasattr(m, "lora_A") and m.lora_A)
        if not injected:
            raise RuntimeError("diffusers loaded the benchmark's LoRA files but injected nothing")
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            pipe(scene(len(files)), height=size, width=size, num_inference_steps=steps + 1, guidance_scale=7.0,
                 generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=tick, output_type="latent")
    finally:
        pipe.unload_lora_weights()
    steps_taken = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return {"steps": steps_taken, "peak": memory.peak, "peak_with_decoding": memory.peak, "latents": None,
            "passes": 1.0}


def model_rows(model: str, ns: list[int], size: int, steps: int, device: str, dtype, official: bool,
               peer: bool | None = None, log=print) -> tuple[list[dict], list[dict], list[dict]]:
    from speed_references import OFFICIAL_PARAMS, SAME_MATHS, official_way

    pipe = build_pipe(model, device, dtype)
    folder = Path(tempfile.mkdtemp(prefix="speed-"))
    files, pair = write_files(pipe, model, folder, max(ns + [2]))
    measure(pipe, composition_for("one_lora", 1, files, pair, size, 1))  # the process's own warm-up, not timed
    baselines = [("plain", 1, "ours"), ("one_lora", 1, "ours")]
    plan = list(baselines)
    for k, n in enumerate(ns):
        plan += [("one_lora", 1, "ours")] if k else []  # between groups too: the machine's speed drifts
        plan += [(m, n, "ours") for m in N_METHODS]
        if official:
            references = OFFICIAL_ON_CPU.get(model, OFFICIAL) if device == "cpu" else OFFICIAL
            plan += [(m, n, "official") for m in references if n <= OFFICIAL_MAX_N.get(m, n)]
    plan += [(m, 2, "ours") for m in PAIR_METHODS] + [("one_lora", 1, "ours")]  # again: its drift is reported
    if peer is None:
        peer = device != "cpu" or model in PEER_ON_CPU
    if peer:  # last: the pipeline has had PEFT layers in it
        plan += [("one_lora", 1, "diffusers")] + [("merge", n, "diffusers") for n in ns]
    measured, checks, drift, local_baseline, skipped = {}, [], {}, {}, []
    latest_one = None  # the last one-LoRA run's own seconds per step: each row's ratio is to the one nearest in time
    for method, n, way in plan:
        started = time.perf_counter()
        composition = composition_for(method, n, files, pair, size, steps)
        context = None
        if way == "official":
            composition = composition.model_copy(update={"params": {**composition.params,
                                                                     **OFFICIAL_PARAMS.get(method, {})}})
            context = official_way(method)
        if way == "diffusers":
            try:
                run = measure_diffusers(pipe, files[:n], size, steps)
            except Exception as exc:  # noqa: BLE001 — the peer's own loader; its refusal is reported, not fatal
                skipped.append({"model": model, "method": method, "n": n, "way": way, "why": str(exc)[:300]})
                log(f"  {model} {method} N={n} diffusers: skipped ({str(exc)[:120]})")
                continue
        else:
            run = measure(pipe, composition, context, decode=method in ("plain", "one_lora"))
        per_step, guidance_iteration = timed_steps(method, run["steps"])
        first = measured.get((method, n, way))
        if first is not None:  # a baseline measured again: every run's steps pooled, its drift kept
            drift[method] = round(per_step / first["first_s_per_step"] - 1, 3)
            run = {**run, "steps": first["steps"] + run["steps"][1:], "peak": max(first["peak"], run["peak"]),
                   "peak_with_decoding": max(first["peak_with_decoding"] or 0, run["peak_with_decoding"] or 0) or None}
            per_step = statistics.median(run["steps"][1:])
        run["first_s_per_step"] = first["first_s_per_step"] if first is not None else per_step
        if (method, way) == ("one_lora", "ours"):
            latest_one = statistics.median(run["steps"][-steps:])  # this run's own measured steps
        local_baseline[(method, n, way)] = latest_one
        measured[(method, n, way)] = {**run, "s_per_step": per_step, "guidance_iteration": guidance_iteration}
        log(f"  {model} {method:14s} N={n} {way:8s} {per_step:7.3f} s/step  peak {run['peak'] / 1e6:8.1f} MB  "
            f"({time.perf_counter() - started:.0f} s)")
        if way == "official" and SAME_MATHS[method]:
            ours, theirs = measured[(method, n, "ours")]["latents"], run["latents"]
            difference = float((ours - theirs).abs().max() / ours.abs().max())
            checks.append({"model": model, "method": method, "n": n, "max_relative_latent_difference": difference,
                           "tolerance": LATENT_TOLERANCE, "same": difference <= LATENT_TOLERANCE})
    one = measured[("one_lora", 1, "ours")]
    rows = []
    for (method, n, way), run in measured.items():
        baseline = one["s_per_step"] if method in ("plain", "one_lora") else local_baseline[(method, n, way)]
        row = {"method": method, "n": n, "model": model, "way": way, "s_per_step": round(run["s_per_step"], 4),
               "ratio": round(run["s_per_step"] / baseline, 3), "one_lora_s_per_step_nearest": round(baseline, 4),
               "peak_mem_ratio": round(run["peak"] / max(one["peak"], 1), 3),
               "peak_mem_mb": round(run["peak"] / 1e6, 1),
               "peak_mem_with_decoding_mb": (round(run["peak_with_decoding"] / 1e6, 1) if run["peak_with_decoding"]
                                             else None),
               "unet_passes_per_step": run["passes"]}
        if run["guidance_iteration"] is not None:
            # the default schedule on 20 steps: every step guided, and 19 more iterations at steps 0 and 10
            whole = (20 * run["s_per_step"] + 38 * run["guidance_iteration"]) / 20
            row["guidance_iteration_s"] = round(run["guidance_iteration"], 4)
            row["whole_generation_ratio"] = round(whole / baseline, 3)
        rows.append(row)
    for row in rows:
        if row["method"] in drift:
            row["drift_between_first_and_last_run"] = drift[row["method"]]
    del pipe
    return rows, checks, skipped


# --- beyond one image -------------------------------------------------------------------------------------------
def startup_times(log=print) -> dict:
    """Fresh processes: `studio serve` to a first image through its API, and Studio.load() to a first image."""
    script = ("import time; t0 = time.perf_counter()\n"
              "import studio.api, studio.models\n"
              "from diffusers import StableDiffusionPipeline\n"
              "from transformers import CLIPTextModel\n"
              "t1 = time.perf_counter(); s = studio.api.Studio.load(); t2 = time.perf_counter()\n"
              "s.generate('assets/presets/two-concepts.json'); t3 = time.perf_counter()\n"
              "s.generate('assets/presets/two-concepts.json'); t4 = time.perf_counter()\n"
              "print({'imports_s': t1 - t0, 'load_s': t2 - t1, 'first_image_s': t3 - t2, "
              "'next_image_s': t4 - t3})")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    api = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 — our own subprocess's dict of floats
    api["load_to_first_image_s"] = api["load_s"] + api["first_image_s"]
    log(f"  Studio.load() → first image {api['load_to_first_image_s']:.2f} s (+ imports {api['imports_s']:.2f} s)")
    return {"api": {k: round(v, 3) for k, v in api.items()}, "serve": serve_to_first_image(log)}


def serve_to_first_image(log=print) -> dict:
    import shutil
    import socket

    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    outputs = tempfile.mkdtemp(prefix="lora-studio-speed-")
    server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", str(port), "--outputs", outputs],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        while client is None:
            if time.perf_counter() - start > 300:
                raise RuntimeError("studio serve did not answer within 300 s")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # noqa: BLE001 — not listening yet
                time.sleep(0.1)
        ready = time.perf_counter()
        client.predict("two-concepts", 0, [], api_name="/generate")
        done = time.perf_counter()
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(outputs, ignore_errors=True)
    log(f"  studio serve → first image {done - start:.2f} s (page ready after {ready - start:.2f} s)")
    return {"serve_to_ready_s": round(ready - start, 3), "serve_to_first_image_s": round(done - start, 3),
            "first_image_s": round(done - ready, 3)}


def library_times(count: int = 500, log=print) -> dict:
    """A library of `count` LoRA files (the synthetic writer, for the bundled model): the first scan, a rescan, the
    same through `studio inspect FOLDER` in a fresh process, and hashing them all when asked for."""
    from studio.lora.library import scan_library
    from studio.lora.synthetic import write_random_lora
    from studio.models import load_base_model

    folder = Path(tempfile.mkdtemp(prefix="library-"))
    cache = Path(tempfile.mkdtemp(prefix="cache-"))
    os.environ["LORA_STUDIO_CACHE"] = str(cache)
    pipe = load_base_model()
    for k in range(count):
        write_random_lora(folder / f"lora-{k:03d}.safetensors", pipe, "shapes_world_v1", rank=4, seed=k,
                          trigger=f"w{k}")
    start = time.perf_counter()
    entries = scan_library(folder)
    first = time.perf_counter() - start
    start = time.perf_counter()
    scan_library(folder)
    rescan = time.perf_counter() - start
    start = time.perf_counter()
    for entry in entries:
        entry.info.sha256
    hashing = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "studio.cli", "inspect", str(folder), "--json"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "LORA_STUDIO_CACHE": str(cache)})
    cli = time.perf_counter() - start
    log(f"  library of {count}: first scan {first:.2f} s, rescan {rescan:.3f} s, hashing all {hashing:.2f} s, "
        f"studio inspect FOLDER {cli:.2f} s")
    return {"files": count, "first_scan_s": round(first, 3), "rescan_s": round(rescan, 4),
            "hash_all_when_asked_s": round(hashing, 3), "studio_inspect_folder_s": round(cli, 3),
            "usable": sum(e.usable for e in entries)}


# --- reports ----------------------------------------------------------------------------------------------------
TARGETS = [  # (model, method, n, field, at most, what)
    ("sd15", "regional", 2, "ratio", 1.1, "regional N = 2 ≤ 1.1×"),
    ("sd15", "regional", 8, "ratio", 1.4, "regional N = 8 ≤ 1.4×"),
    ("sd15", "clora", 2, "ratio", 2.5, "CLoRA N = 2 ≤ 2.5× (a guided step)"),
    ("sd15", "lora_composer", 2, "ratio", 2.0, "LoRA-Composer ≤ 2× (a guided step: every step at most)"),
    ("sd15", "regional", 4, "peak_mem_ratio", 1.25, "regional peak memory ≤ 1.25× at N = 4"),
]


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    index = {(r["model"], r["method"], r["n"], r["way"]): r for r in rows}
    for model, method, n, field, limit, what in TARGETS:
        row = index.get((model, method, n, "ours"))
        if row is None:
            continue
        value = row[field]
        lines.append(f"- {what}: {value:.2f}× — {'met' if value <= limit else '**missed**'}")
    merge8, regional8 = index.get(("sd15", "merge", 8, "ours")), index.get(("sd15", "regional", 8, "ours"))
    if merge8 and regional8:
        gap = regional8["s_per_step"] / merge8["s_per_step"] - 1
        lines.append(f"- regional within 15 % of merge at N = 8: {gap:+.0%} — {'met' if gap <= 0.15 else '**missed**'}")
    for method in ("merge", "lora_composer", "clora", "switch", "composite"):
        row = index.get(("sd15", method, 4, "ours"))
        if row:
            lines.append(f"- {method} peak memory at N = 4: {row['peak_mem_ratio']:.2f}× of one LoRA")
    return lines


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = ["# Speed and memory\n", f"Measured by `{report['command']}` on {report['machine']}, "
             f"{report['size']} px, median of {report['steps']} steps after a warm-up step; ratios to one LoRA on "
             "the same model in the same run, timed again before each group of N (each row's ratio is to the "
             "one-LoRA run nearest before it: the machine's speed drifts).\n"]
    for model in dict.fromkeys(r["model"] for r in rows):
        index = {(r["method"], r["n"], r["way"]): r for r in rows if r["model"] == model}
        with_peer = any(way == "diffusers" for _, _, way in index)
        lines += [f"## {model}\n", "| method | N | ours s/step | ratio | official way s/step | ratio | our speed-up | "
                  "peak memory (ratio) |" + (" diffusers + PEFT s/step (ratio) |" if with_peer else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if with_peer else "")]
        for (method, n, way), row in index.items():
            if way != "ours":
                continue
            theirs = index.get((method, n, "official"))
            ratio = f"{row['ratio']:.2f}×"
            if "whole_generation_ratio" in row:
                ratio += f" ({row['whole_generation_ratio']:.2f}× whole run)"
            official = (f"{theirs['s_per_step']:.2f} | {theirs['ratio']:.2f}×"
                        + (f" ({theirs['whole_generation_ratio']:.2f}× whole run)"
                           if "whole_generation_ratio" in theirs else "")
                        + f" | {theirs['s_per_step'] / row['s_per_step']:.2f}×") if theirs else "— | — | —"
            peer = index.get((method, n, "diffusers"))
            peer_cell = (f" {peer['s_per_step']:.2f} ({peer['ratio']:.2f}×) |" if peer else " — |") if with_peer else ""
            lines.append(f"| {method} | {n} | {row['s_per_step']:.2f} | {ratio} | {official} | "
                         f"{row['peak_mem_mb']:.0f} MB ({row['peak_mem_ratio']:.2f}×) |{peer_cell}")
        lines.append("")
    if report["checks"]:
        lines += ["## Same image as the official way\n", "| model | method | N | max relative latent difference | same |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['method']} | {c['n']} | {c['max_relative_latent_difference']:.1e} | "
                  f"{'yes' if c['same'] else '**no**'} (≤ {c['tolerance']:.0e}) |" for c in report["checks"]]
        lines.append("")
    lines += [f"- {s['model']} {s['method']} N = {s['n']} ({s['way']}) not measured: {s['why']}"
              for s in report.get("skipped", [])]
    lines += ["## Targets\n", *target_lines(rows), ""]
    if report.get("startup"):
        api, serve = report["startup"]["api"], report["startup"]["serve"]
        lines += ["## Beyond one image\n",
                  f"- `Studio.load()` → first image: {api['load_to_first_image_s']:.2f} s (load {api['load_s']:.2f} s, "
                  f"the two-concepts example {api['first_image_s']:.2f} s, the next one {api['next_image_s']:.2f} s); "
                  f"importing torch and diffusers before it: {api['imports_s']:.2f} s",
                  f"- `studio serve` → first image through its API: {serve['serve_to_first_image_s']:.2f} s (the page "
                  f"answers after {serve['serve_to_ready_s']:.2f} s)"]
    if report.get("library"):
        lib = report["library"]
        lines += [f"- library of {lib['files']} LoRA files: first scan {lib['first_scan_s']:.2f} s, rescan "
                  f"{lib['rescan_s']:.3f} s, `studio inspect FOLDER` in a new process {lib['studio_inspect_folder_s']:.2f}"
                  f" s; hashes only when asked for ({lib['hash_all_when_asked_s']:.2f} s for all, then cached)", ""]
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    """Bars of the ratio to one LoRA per method and N, ours beside the official way (PIL, no plotting library)."""
    from PIL import Image, ImageDraw

    shown = [r for r in rows if r["method"] not in ("plain", "one_lora")]
    groups = list(dict.fromkeys((r["model"], r["method"], r["n"]) for r in shown))
    index = {(r["model"], r["method"], r["n"], r["way"]): r for r in shown}
    top = max(r["ratio"] for r in shown)
    scale = 600 / max(top, 1.0)
    height = 40 + 22 * len(groups) + 40
    image = Image.new("RGB", (900, height), "white")
    draw = ImageDraw.Draw(image)
    left = 230
    # the default bitmap font has no × or ÷
    draw.text((10, 10), "seconds per step / one LoRA's (blue: ours, orange: the official way)", fill="black")
    for x in range(0, int(top) + 2):
        px = left + x * scale
        draw.line([(px, 30), (px, height - 30)], fill=(220, 220, 220))
        draw.text((px - 4, height - 25), f"{x}x", fill="black")
    for i, key in enumerate(groups):
        y = 36 + 22 * i
        model, method, n = key
        draw.text((10, y + 3), f"{model} {method} N={n}", fill="black")
        ours, theirs = index.get(key + ("ours",)), index.get(key + ("official",))
        if ours:
            draw.rectangle([left, y, left + ours["ratio"] * scale, y + 9], fill=(60, 110, 200))
        if theirs:
            draw.rectangle([left, y + 10, left + theirs["ratio"] * scale, y + 19], fill=(240, 140, 40))
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="studio bench speed")
    parser.add_argument("--quick", action="store_true", help="SD1.5 only, N = 2, no startup timings.")
    parser.add_argument("--models", default=None, help="Comma-separated: sd15, sdxl, shapes (the bundled model).")
    parser.add_argument("--ns", default=None, help="Comma-separated numbers of LoRAs (default by model).")
    parser.add_argument("--size", type=int, default=None, help="Image size in pixels (default 256; shapes: 64).")
    parser.add_argument("--steps", type=int, default=3, help="Measured steps after the warm-up step.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="Half precision (GPU).")
    parser.add_argument("--no-official", action="store_true", help="Leave out the official-way references.")
    parser.add_argument("--no-startup", action="store_true", help="Leave out the startup and library timings.")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                        help="Plain diffusers + PEFT with set_adapters (one LoRA and merge) as the peer's floor "
                             "(default: on a GPU for every model, on a CPU for SD1.5).")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    models = (args.models or ("sd15" if args.quick else "sd15,sdxl")).split(",")
    dtype = torch.float16 if args.fp16 else torch.float32
    begin = time.perf_counter()
    rows, checks, skipped = [], [], []
    for model in models:
        ns = [int(v) for v in args.ns.split(",")] if args.ns else ([2] if args.quick else DEFAULT_NS[model])
        size = args.size or (64 if model == "shapes" else 256)
        print(f"{model}: {size} px, N = {ns}", flush=True)
        model_rows_, model_checks, model_skipped = model_rows(model, ns, size, args.steps, args.device, dtype, not args.no_official,
                                               args.peer, log=lambda line: print(line, flush=True))
        rows += model_rows_
        checks += model_checks
        skipped += model_skipped
    device = torch.device(args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    report = {"command": "studio bench speed " + " ".join(argv or []), "machine": machine,
              "size": args.size or 256, "steps": args.steps, "dtype": str(dtype).removeprefix("torch."),
              "rows": rows, "checks": checks, "skipped": skipped}
    if not args.quick and not args.no_startup:
        print("beyond one image", flush=True)
        report["startup"] = startup_times()
        report["library"] = library_times()
    report["seconds"] = round(time.perf_counter() - begin, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "speed.md").write_text(markdown(report) + f"\nThe whole run took {report['seconds'] / 60:.1f} minutes.\n")
    chart(rows, out / "speed.png")
    print(markdown(report))
    print(f"wrote {out / 'speed.json'}, speed.md and speed.png in {report['seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main(sys.argv[1:])
