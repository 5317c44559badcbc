"""Soak: a long run of the Python API on the bundled model, as a studio left running for a day sees it.

Random valid compositions (every method, random LoRAs of the bundled examples, boxes, weights, steps, seeds)
with bad requests injected among them (corrupt, truncated, pickled and NaN LoRA files, paths outside the library,
sizes and steps over the limits, unknown methods and parameters, cut-short presets). It measures the process's
resident memory after a warm-up and at the end, checks that every bad request is refused with a StudioError and
leaves the pipeline exactly as it was, and that at the end the pipeline equals a freshly loaded one (no leaked
processors, adapters or changed weights).

Usage: studio bench soak [--minutes 30] [--generations 500] [--seed 0] [--quick] [--summarise]
Writes bench/results/soak.json and soak.md."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONCEPTS = ["crescent-sks", "cross-ohwx", "heart-hrtz", "ringed-rngd"]
STYLES = ["cyanotype-cynx", "sepia-sepx", "checkered-chkrd"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple"]
WARM_UP = 25  # generations before the memory baseline: every method's first run allocates its buffers


def random_box(rng: random.Random, side: str) -> list[float]:
    width, height = rng.uniform(0.3, 0.5), rng.uniform(0.35, 0.7)
    x0 = rng.uniform(0.0, 0.5 - width) if side == "left" else rng.uniform(0.5, 1.0 - width)
    y0 = rng.uniform(0.0, 1.0 - height)
    return [round(x0, 3), round(y0, 3), round(x0 + width, 3), round(y0 + height, 3)]


def trigger(name: str) -> str:
    return name.rsplit("-", 1)[1]


def random_composition(rng: random.Random, methods: list[str], loras: Path, b4m: Path) -> dict:
    """A valid composition for a random method."""
    method = rng.choice(methods)
    steps, seed = rng.randint(6, 16), rng.randrange(1 << 31)
    base = {"method": method, "steps": steps, "seed": seed, "guidance": rng.choice([3.0, 5.0, 7.0])}
    if method == "b4m":
        return {**base, "prompt": f"a large solid {rng.choice(COLOURS)} ohwx sepx in the centre, white background",
                "loras": [{"file": str(b4m / "cross-content.safetensors"), "trigger_words": ["ohwx"]},
                          {"file": str(b4m / "sepia-style.safetensors"), "role": "style", "trigger_words": ["sepx"]}]}
    if method == "k_lora":
        concept, style = rng.choice(CONCEPTS), rng.choice(STYLES)
        return {**base, "prompt": f"a large {trigger(style)} {rng.choice(COLOURS)} {trigger(concept)} in the "
                                  "centre, white background",
                "loras": [{"file": str(loras / f"{concept}.safetensors"), "trigger_words": [trigger(concept)]},
                          {"file": str(loras / f"{style}.safetensors"), "role": "style",
                           "trigger_words": [trigger(style)]}]}
    first, second = rng.sample(CONCEPTS, 2)
    colours = rng.sample(COLOURS, 2)
    parts = [f"a large solid {colours[0]} {trigger(first)} on the left",
             f"a large solid {colours[1]} {trigger(second)} on the right"]
    entries = [{"file": str(loras / f"{name}.safetensors"), "trigger_words": [trigger(name)],
                "weight": round(rng.uniform(0.6, 1.2), 2), "region": {"box": random_box(rng, side)},
                "prompt": f"{part}, white background"}
               for name, side, part in zip((first, second), ("left", "right"), parts)]
    if rng.random() < 0.3:
        style = rng.choice(STYLES)
        entries.append({"file": str(loras / f"{style}.safetensors"), "role": "style",
                        "trigger_words": [trigger(style)], "weight": round(rng.uniform(0.4, 0.9), 2)})
    return {**base, "prompt": f"{parts[0]} and {parts[1]}, white background", "loras": entries}


def bad_requests(folder: Path, loras: Path) -> list[tuple[str, object]]:
    """(what, request) pairs that must each be refused; the files are made in `folder`."""
    import torch
    from safetensors.torch import load_file, save_file

    good = loras / "crescent-sks.safetensors"
    data = good.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    corrupt = bytearray(data)
    corrupt[10:40] = b"\xff" * 30
    (folder / "corrupt.safetensors").write_bytes(bytes(corrupt))
    torch.save({"weights": torch.zeros(2)}, folder / "pickle.safetensors")
    tensors = load_file(str(good))
    first = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(folder / "nan.safetensors"))
    (folder / "folder.safetensors").mkdir(exist_ok=True)
    (folder / "cut.json").write_text('{"prompt": "a red sks", "loras": [{"file": ')

    def with_lora(file: str, **extra) -> dict:
        return {"prompt": "a large solid red sks, white background", "method": "merge", "steps": 6,
                "loras": [{"file": file, "trigger_words": ["sks"]}], **extra}

    return [("truncated LoRA", with_lora("truncated.safetensors")),
            ("empty LoRA", with_lora("empty.safetensors")),
            ("corrupt header", with_lora("corrupt.safetensors")),
            ("pickle named .safetensors", with_lora("pickle.safetensors")),
            ("NaN tensors", with_lora("nan.safetensors")),
            ("a folder as a LoRA", with_lora("folder.safetensors")),
            ("path outside the library", with_lora("../../../../etc/passwd")),
            ("absolute path elsewhere", with_lora("/etc/hostname")),
            ("over max_pixels", {**with_lora(str(good)), "width": 2048, "height": 2048}),
            ("over max_steps", {**with_lora(str(good)), "steps": 900}),
            ("unknown method", {**with_lora(str(good)), "method": "dreambooth"}),
            ("unknown parameter", {**with_lora(str(good)), "method": "regional", "params": {"bogus": 1}}),
            ("box outside the image", {**with_lora(str(good)), "loras": [{"file": str(good),
                                                                          "region": {"box": [0.5, 0, 1.4, 1]}}]}),
            ("cut-short preset", folder / "cut.json")]


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(argv=None):
    parser = argparse.ArgumentParser(prog="studio bench soak")
    parser.add_argument("--minutes", type=float, default=30.0, help="Keep going at least this long.")
    parser.add_argument("--generations", type=int, default=500, help="And at least this many images.")
    parser.add_argument("--bad-every", type=int, default=8, help="One bad request after this many good ones.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 minutes, 40 images (a smoke run; not written).")
    parser.add_argument("--summarise", action="store_true", help="Only rewrite soak.md from soak.json.")
    args = parser.parse_args(argv or [])
    if args.summarise:
        report = summarise(json.loads((RESULTS / "soak.json").read_text()))
        (RESULTS / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "soak.md").write_text(markdown(report))
        return report
    if args.quick:
        args.minutes, args.generations = 2.0, 40

    import gc

    import torch

    from composers import registry
    from studio import paths
    from studio.api import LoraLibrary, Studio
    from studio.errors import StudioError
    from studio.lora import lora_layers
    from studio.models import load_base_model, pipeline_fingerprint

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lora-studio-soak-"))
    library = work / "library"
    library.mkdir()
    bad = bad_requests(library, paths.EXAMPLE_LORAS)
    studio = Studio.load(library=LoraLibrary(library, confined=True))
    studio.pipe.set_progress_bar_config(disable=True)
    fingerprint = pipeline_fingerprint(studio.pipe)
    methods = list(registry())
    out = work / "out"

    start = time.perf_counter()
    n_good = n_bad = 0
    refused, wrongly_accepted, changed = {}, [], []
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    rss_warm = rss_peak = None
    samples = []
    while n_good < args.generations or time.perf_counter() - start < args.minutes * 60:
        if n_good and n_good % args.bad_every == 0 and n_bad < n_good // args.bad_every:
            what, request = bad[n_bad % len(bad)]
            n_bad += 1
            try:
                studio.generate(request)
                wrongly_accepted.append(what)
            except StudioError as exc:
                refused.setdefault(what, str(exc))
            if pipeline_fingerprint(studio.pipe) != fingerprint:
                changed.append(what)
            continue
        composition = random_composition(rng, methods, paths.EXAMPLE_LORAS, paths.EXAMPLE_B4M)
        began = time.perf_counter()
        [result] = studio.generate(composition)
        seconds[composition["method"]].append(time.perf_counter() - began)
        if n_good % 50 == 0:
            result.save(out, f"soak-{n_good:04d}")
        n_good += 1
        del result
        if n_good == WARM_UP:
            gc.collect()
            rss_warm = rss_bytes()
        if n_good % 25 == 0:
            gc.collect()
            rss = rss_bytes()
            rss_peak = max(rss_peak or 0, rss)
            samples.append({"generation": n_good, "minutes": round((time.perf_counter() - start) / 60, 2),
                            "rss_mb": round(rss / 2**20, 1)})
            print(f"{n_good} images, {n_bad} bad requests, {samples[-1]['minutes']} min, "
                  f"RSS {samples[-1]['rss_mb']} MB", flush=True)
    elapsed = time.perf_counter() - start
    gc.collect()
    rss_end = rss_bytes()
    end_fingerprint = pipeline_fingerprint(studio.pipe)
    leaked_layers = len(lora_layers(studio.pipe))
    fresh = load_base_model()
    fresh.set_progress_bar_config(disable=True)
    equals_fresh = pipeline_fingerprint(fresh) == end_fingerprint
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    report = {
        "generations": n_good, "bad_requests": n_bad, "minutes": round(elapsed / 60, 1),
        "rss_after_warm_up_mb": round(rss_warm / 2**20, 1) if rss_warm else None,
        "rss_end_mb": round(rss_end / 2**20, 1), "rss_peak_mb": round((rss_peak or rss_end) / 2**20, 1),
        "rss_growth": round(growth, 4) if growth is not None else None,
        "every_bad_request_refused": not wrongly_accepted, "wrongly_accepted": wrongly_accepted,
        "pipeline_changed_by": changed, "lora_layers_left": leaked_layers,
        "pipeline_equals_a_fresh_one": equals_fresh,
        "per_method": {m: {"images": len(v), "mean_s": round(statistics.mean(v), 2)} for m, v in seconds.items() if v},
        "refusals": refused, "rss_samples": samples,
        "targets": {"rss_growth_max": 0.05},
        "command": "studio bench soak" + (f" --minutes {args.minutes:g} --generations {args.generations}"
                                          if (args.minutes, args.generations) != (30.0, 500) else ""),
    }
    report = summarise(report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("rss_samples", "refusals")}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if args.quick:
        return report
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "soak.md").write_text(markdown(report))
    print(f"wrote {RESULTS / 'soak.json'} and soak.md")
    return report


def summarise(report: dict) -> dict:
    """Add the growth trend (median of the last five samples against the first five after warm-up: one sample
    of RSS moves by a few percent as the allocator keeps or returns memory) and the verdict."""
    after = [s["rss_mb"] for s in report["rss_samples"] if s["generation"] > WARM_UP]
    trend = (statistics.median(after[-5:]) / statistics.median(after[:5]) - 1) if len(after) >= 10 else None
    report["rss_growth_trend"] = round(trend, 4) if trend is not None else None
    growth = trend if trend is not None else report["rss_growth"]
    report["passed"] = bool(growth is not None and growth <= 0.05 and not report["wrongly_accepted"]
                            and not report["pipeline_changed_by"] and report["pipeline_equals_a_fresh_one"]
                            and report["lora_layers_left"] == 0)
    return report


def markdown(report: dict) -> str:
    growth = report["rss_growth"]
    lines = [f"Soak on the bundled model through the Python API (`{report['command']}`): "
             f"{report['generations']} images and {report['bad_requests']} bad requests in {report['minutes']} min.",
             "",
             "| measure | result | target |", "|---|---|---|",
             f"| resident memory after warm-up → end | {report['rss_after_warm_up_mb']} → {report['rss_end_mb']} MB "
             f"({growth:+.1%}) | ≤ +5 % |" if growth is not None else "| resident memory | not measured | ≤ +5 % |",
             *([f"| resident memory trend (median of the last 5 samples / first 5 after warm-up) | "
                f"{report['rss_growth_trend']:+.1%} | ≤ +5 % |"] if report.get("rss_growth_trend") is not None else []),
             f"| peak resident memory | {report['rss_peak_mb']} MB | — |",
             f"| bad requests refused (StudioError, one sentence) | {report['bad_requests'] - len(report['wrongly_accepted'])}"
             f" of {report['bad_requests']} | all |",
             f"| pipeline unchanged after each refusal | {'yes' if not report['pipeline_changed_by'] else 'no: ' + ', '.join(report['pipeline_changed_by'])} | yes |",
             f"| LoRA layers left attached at the end | {report['lora_layers_left']} | 0 |",
             f"| pipeline equals a freshly loaded one at the end | {'yes' if report['pipeline_equals_a_fresh_one'] else 'no'} | yes |",
             "", "| method | images | mean s / image |", "|---|---:|---:|"]
    lines += [f"| {m} | {v['images']} | {v['mean_s']} |" for m, v in report["per_method"].items()]
    lines += ["", "Refusals, as the user reads them:", ""]
    lines += [f"- {what}: {sentence}" for what, sentence in report["refusals"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
