"""Batches: manifests (JSON, CSV), atomic outputs, resuming after a kill, per-item failures, and the Ray engine
giving the same files as the local one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from typer.testing import CliRunner

from studio.batch import load_manifests, run_batch
from studio.cli import app
from studio.spec import Composition, LoraEntry, Region, save_preset

runner = CliRunner()


def write_presets(folder, loras, steps=2):
    """Two presets with the same file name in two folders (their outputs must not overwrite each other)."""
    paths = []
    for sub, lora, box in (("a", "alpha", (0, 0, 0.5, 1)), ("b", "beta", (0.5, 0, 1, 1))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        composition = Composition(prompt="a large solid red sks, white background", steps=steps, method="regional",
                                  loras=[LoraEntry(file=str(loras[lora]), region=Region(box=box))])
        save_preset(composition, folder / sub / "scene.json")
        paths.append(folder / sub / "scene.json")
    return paths


def images(folder):
    return sorted(p.name for p in folder.glob("*.png") if "-map" not in p.name and "-mask" not in p.name)


def test_a_manifest_of_presets_inline_compositions_and_prompts_runs_each_once_and_resumes(
        tiny_folder, tiny_loras, tmp_path):
    presets = write_presets(tmp_path, tiny_loras)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"seeds": "0-1", "items": [
        {"preset": "a/scene.json"}, {"preset": "b/scene.json", "seeds": [7]},
        {"name": "inline", "composition": {"prompt": "a blue ohwx", "steps": 1, "method": "merge",
                                           "loras": [{"file": str(tiny_loras["beta"])}]},
         "overrides": [{"guidance": 3.0}, {"guidance": 6.0}]},
        {"prompt": f"a red sks <lora:{tiny_loras['alpha'].stem}:0.7>", "seeds": "3"}]}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--model", str(tiny_folder),
                                 "--library", str(tiny_loras["alpha"].parent)])
    assert result.exit_code == 0, result.output
    assert "| 8 | 0 | 0 |" in result.stdout  # 2 + 1 + 2 × 2 + 1 images, none skipped or failed
    names = images(out)
    assert len(names) == 8 and len(set(names)) == 8
    assert sum(n.startswith("scene-regional-") for n in names) == 3  # both scene.json kept apart
    index = json.loads((out / "index.json").read_text())["items"]
    assert all(r["status"] == "done" for r in index.values())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--model", str(tiny_folder),
                                "--library", str(tiny_loras["alpha"].parent)])
    assert again.exit_code == 0 and "| 0 | 8 | 0 |" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "index.json"} == \
        {k: v for k, v in stamps.items() if k != "index.json"}
    del presets


def test_a_csv_manifest_with_overrides(tiny_folder, tiny_loras, tmp_path):
    write_presets(tmp_path, tiny_loras)
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("name,preset,prompt,seeds,method,steps\n"
                        "left,a/scene.json,,1-2,merge,1\n"
                        f"tagged,,a sks <lora:{tiny_loras['alpha'].stem}>,5,,1\n")
    report = run_batch(load_manifests([manifest]), tmp_path / "out", model=str(tiny_folder),
                       library=str(tiny_loras["alpha"].parent), progress=False)
    assert len(report.done) == 3 and not report.failed
    assert images(tmp_path / "out") == ["left-merge-1.png", "left-merge-2.png", "tagged-merge-5.png"]


def test_a_bad_item_is_refused_before_anything_runs(tiny_folder, tiny_loras, tmp_path):
    [good, _] = write_presets(tmp_path, tiny_loras)
    result = runner.invoke(app, ["batch", str(good), str(tmp_path / "missing.json"), "--out", str(tmp_path / "out"),
                                 "--model", str(tiny_folder)])
    assert result.exit_code == 2 and "missing.json" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"items": [{"prompt": "x", "overrides": [{"steps": 0}]}]}))
    result = runner.invoke(app, ["batch", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Manifest item 1" in result.output and "steps" in result.output
    assert runner.invoke(app, ["batch", str(good), "--seeds", "x", "--out", str(tmp_path)]).exit_code == 2


def test_an_item_that_fails_at_run_time_is_recorded_and_the_batch_goes_on(tiny_folder, tiny_loras, tmp_path,
                                                                          monkeypatch):
    import torch

    from studio.api import Studio

    [good, _] = write_presets(tmp_path, tiny_loras)
    real_run = Studio.run

    def run(self, composition, callback=None):
        if composition.seed == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run(self, composition, callback)

    monkeypatch.setattr(Studio, "run", run)
    report = run_batch(load_manifests([good], seeds="0-2"), tmp_path / "out", model=str(tiny_folder), progress=False)
    assert [r["seed"] for r in report.done] == [0, 2]
    [failed] = report.failed
    assert failed["seed"] == 1 and failed["error"].startswith("The device ran out of memory")
    assert "| 2 | 0 | 1 |" in report.table()
    monkeypatch.setattr(Studio, "run", real_run)
    report = run_batch(load_manifests([good], seeds="0-2"), tmp_path / "out", model=str(tiny_folder), progress=False)
    assert len(report.skipped) == 2 and [r["seed"] for r in report.done] == [1]  # the failed one is retried


def test_a_batch_killed_midway_resumes_with_nothing_redone_missing_or_partial(tiny_folder, tiny_loras, tmp_path):
    [good, _] = write_presets(tmp_path, tiny_loras, steps=6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "studio.cli", "batch", str(good), "--seeds", "0-5", "--out", str(out),
               "--model", str(tiny_folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(images(out) if out.exists() else []) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = {name: (out / name).stat().st_mtime_ns for name in images(out)}
    assert 2 <= len(first) < 6, "the kill should land mid-batch"
    result = runner.invoke(app, ["batch", str(good), "--seeds", "0-5", "--out", str(out), "--model", str(tiny_folder)])
    assert result.exit_code == 0, result.output
    assert images(out) == [f"scene-regional-{s}.png" for s in range(6)]
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in first.items())  # nothing redone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial file left
    for name in images(out):
        Image.open(out / name).load()  # every image whole
    index = json.loads((out / "index.json").read_text())["items"]
    assert sorted(r["seed"] for r in index.values()) == list(range(6))


def test_the_ray_engine_writes_the_same_files_as_the_local_engine_and_retries_a_dead_workers_item(
        tiny_folder, tiny_loras, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    presets = write_presets(tmp_path, tiny_loras)
    manifest = load_manifests(presets, seeds="0-3")
    local = run_batch(manifest, tmp_path / "local", model=str(tiny_folder), progress=False)
    assert len(local.done) == 8
    monkeypatch.setenv("LORA_STUDIO_RAY_TEST_FAIL_ONCE", str(tmp_path / "worker-died"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"LORA_STUDIO_RAY_TEST_FAIL_ONCE": str(tmp_path / "worker-died")}})
    try:
        remote = run_batch(manifest, tmp_path / "ray", model=str(tiny_folder), engine="ray", workers=2,
                           progress=False)
    finally:
        ray.shutdown()
    assert (tmp_path / "worker-died").exists()  # one worker died mid-batch …
    assert len(remote.done) == 8 and not remote.failed  # … and its item was run elsewhere
    local_files = sorted(p.name for p in (tmp_path / "local").glob("*.png"))
    assert local_files == sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    for name in local_files:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
