"""Batch generation on one machine: presets × seeds, each base model loaded once, every result written
with its maps and masks, and an index (`index.jsonl`, one line per job) beside them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError


@dataclass
class BatchJob:
    preset: Path
    seed: int | None
    method: str | None = None


def parse_seeds(text: str | None) -> list[int | None]:
    """"0-3" → [0, 1, 2, 3]; "1,5,9" → [1, 5, 9]; None → the presets' own seeds."""
    if not text:
        return [None]
    seeds = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise StudioError(f"Seeds {text!r} are not like 0-3 or 1,5,9.")
        seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return seeds


def run_batch(jobs: list[BatchJob], out_dir: Path, model: str | None = None, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    from studio.compose import compose
    from studio.models import load_base_model
    from studio.outputs import write_result
    from studio.spec import load_preset

    out_dir.mkdir(parents=True, exist_ok=True)
    pipes: dict[str | None, object] = {}
    records = []
    with open(out_dir / "index.jsonl", "a") as index:
        for job in tqdm(jobs, desc="batch", disable=not progress):
            record = {"preset": str(job.preset), "seed": job.seed, "method": job.method}
            try:
                composition = load_preset(job.preset).with_overrides(method=job.method, seed=job.seed)
                ref = model or composition.base_model
                if ref not in pipes:
                    pipes[ref] = load_base_model(ref)
                start = time.perf_counter()
                result = compose(pipes[ref], composition)
                written = write_result(result, composition, out_dir, stem=job.preset.stem)
                record.update(seed=composition.seed, method=composition.method, image=str(written[0]),
                              maps_and_masks=[str(p) for p in written[1:]], seconds=time.perf_counter() - start,
                              unet_passes_per_step=result.info["unet_passes_per_step"])
            except StudioError as exc:
                record["error"] = str(exc)
            index.write(json.dumps(record) + "\n")
            records.append(record)
    return records
