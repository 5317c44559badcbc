"""Bad input on every path (Python API, CLI, web studio): one sentence naming the file and the problem, exit
code 2 on the CLI, the loaded pipeline and adapters exactly as before (hashed), no pickle ever executed; limits
refused up front; the web studio's library confined to its folders; a killed writer leaves the previous file."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from studio.api import Studio
from studio.cli import app
from studio.errors import StudioError
from studio.limits import Limits
from studio.lora import lora_layers
from studio.models import pipeline_fingerprint

runner = CliRunner()


# --- bad files --------------------------------------------------------------------------------------------


def _header_file(path: Path, header_bytes: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)
    return path


def _rewrite(good: Path, path: Path, change) -> Path:
    tensors = load_file(str(good))
    change(tensors)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "shapes_world_v1"})
    return path


def _first_2d(tensors: dict) -> str:
    return next(k for k, v in sorted(tensors.items()) if v.ndim == 2 and k.endswith("lora_down.weight"))


def _wrong_shape(tensors: dict) -> None:
    key = _first_2d(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)


def _huge_metadata(path: Path) -> Path:
    """A header announcing 101 MiB (a sparse file: the length is real, the disk cost is not)."""
    length = 101 << 20
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + b'{"__metadata__": {"x": "')
        f.seek(8 + length + 16)
        f.write(b"\0")
    return path


BAD_FILES = {
    "truncated": (lambda good, p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]) and p, "truncated"),
    "header past the end": (lambda good, p: p.write_bytes((5000).to_bytes(8, "little") + b"{}") and p,
                            "header announces 5000 bytes"),
    "non-UTF-8 metadata": (lambda good, p: _header_file(p, b'{"__metadata__": {"x": "\xff\xfe"}}'),
                           "corrupt safetensors header"),
    "huge metadata": (lambda good, p: _huge_metadata(p), "MiB safetensors header"),
    "NaN tensors": (lambda good, p: _rewrite(good, p, lambda t: t[_first_2d(t)].fill_(float("nan"))), "NaN"),
    "Inf tensors": (lambda good, p: _rewrite(good, p, lambda t: t[_first_2d(t)].fill_(float("inf"))), "infinite"),
    "shapes that fit no layer": (lambda good, p: _rewrite(good, p, _wrong_shape), "does not fit"),
    "empty": (lambda good, p: p.write_bytes(b"") or p, "only 0 bytes"),
    "a folder": (lambda good, p: p.mkdir() or p, "is a folder, not a LoRA file"),
    "a zip pickle renamed": (lambda good, p: torch.save({"w": torch.zeros(2)}, p) or p, "zip archive"),
    "a raw pickle renamed": (lambda good, p: p.write_bytes(pickle.dumps({"w": 1}, protocol=4)) or p, "Python pickle"),
}


@pytest.fixture(scope="module")
def good_lora(tiny_loras):
    return tiny_loras["alpha"]


@pytest.fixture(scope="module")
def bad_folder(good_lora, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    files = {}
    for index, (name, (make, _)) in enumerate(BAD_FILES.items()):
        files[name] = folder / f"bad{index}.safetensors"
        make(good_lora, files[name])
    return files


@pytest.fixture(scope="module")
def api_studio(tiny_pipe, bad_folder, tmp_path_factory):
    return Studio(tiny_pipe, library=next(iter(bad_folder.values())).parent)


def one_sentence(message: str, name: str) -> None:
    assert name in message, message
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message


def composition_with(path: Path) -> dict:
    return {"prompt": "a large solid red sks, white background", "steps": 2, "method": "merge",
            "loras": [{"file": str(path), "trigger_words": ["sks"]}]}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_lora_file_is_one_sentence_and_leaves_the_pipeline_as_it_was(kind, bad_folder, api_studio, tiny_folder,
                                                                          tmp_path):
    path, problem = bad_folder[kind], BAD_FILES[kind][1]
    pipe = api_studio.pipe
    before = pipeline_fingerprint(pipe)
    with pytest.raises(StudioError) as error:
        api_studio.generate(composition_with(path))
    one_sentence(str(error.value), path.name)
    assert problem in str(error.value)
    assert pipeline_fingerprint(pipe) == before and lora_layers(pipe) == {}
    # the CLI: exit code 2, the same sentence, nothing written
    result = runner.invoke(app, ["generate", "--prompt", "a red sks", "--lora", str(path), "--model", str(tiny_folder),
                                 "--steps", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    one_sentence(result.output.strip().removeprefix("error: "), path.name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, problem", [
    (lambda p: (p.write_text("this is not a PNG"), p)[1], "not a readable PNG image"),
    (lambda p: Image.new("RGB", (8, 8)).save(p) or p, "no `lora-studio` PNG chunk"),
    (lambda p: Image.new("RGB", (8, 8)).save(p, format="JPEG") or p, "JPEG image"),
])
def test_a_png_preset_that_is_not_the_studios_is_one_sentence(make, problem, api_studio, tmp_path):
    preset = make(tmp_path / "preset.png")
    with pytest.raises(StudioError, match=problem) as error:
        api_studio.generate(preset)
    one_sentence(str(error.value), "preset.png")
    result = runner.invoke(app, ["generate", str(preset), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and problem in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text, problem", [
    ('{"prompt": "a", "loras": [', "not valid JSON"),
    (b"\xff\xfe{\x00", "not UTF-8"),
    ("[1, 2]", "not a composition"),
    ('{"prompt": "a", "steps": "many"}', "`steps`"),
])
def test_a_cut_short_or_foreign_json_preset_is_one_sentence(text, problem, api_studio, tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StudioError, match=problem) as error:
        api_studio.generate(preset)
    one_sentence(str(error.value), "preset.json")
    result = runner.invoke(app, ["generate", str(preset), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and problem in result.output


# --- malicious pickles ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle executed')",)


def test_a_malicious_pickle_never_runs_on_any_path(tiny_folder, tiny_pipe, tmp_path):
    from studio.lora import inspect_lora, load_lora
    from studio.webapp import StudioState

    marker = tmp_path / "PWNED"
    library = tmp_path / "library"
    library.mkdir()
    evil = []
    for name in ("evil.pt", "evil.ckpt", "evil.bin", "evil.safetensors"):
        (library / name).write_bytes(pickle.dumps({"lora_down.weight": _Payload(marker)}, protocol=4))
        evil.append(library / name)
    torch.save({"lora_down.weight": _Payload(marker)}, library / "evil-zip.safetensors")
    evil.append(library / "evil-zip.safetensors")

    studio = Studio(tiny_pipe, library=library)
    for path in evil:
        for attempt in (lambda: inspect_lora(path), lambda: load_lora(path), lambda: load_lora(path, allow_pickle=True),
                        lambda: studio.add_lora(path), lambda: studio.generate(composition_with(path))):
            with pytest.raises(StudioError):
                attempt()
        for command in (["inspect", str(path)], ["generate", "--prompt", "a", "--lora", str(path), "--model",
                                                 str(tiny_folder), "--out", str(tmp_path / "out")]):
            assert runner.invoke(app, command).exit_code == 2
    assert all(not entry.usable for entry in studio.library.entries() if entry.path in evil)

    state = StudioState(str(tiny_folder), library=str(library))
    for path in evil:
        with pytest.raises(StudioError):
            state.generate(state.studio.library.composition(composition_with(path.name)), "visitor")
        with pytest.raises(StudioError):
            state.upload(str(path))
    assert not marker.exists(), "a pickle was executed"


# --- limits -----------------------------------------------------------------------------------------------


def test_limits_default_by_device_and_change_by_environment_and_option(monkeypatch):
    assert Limits.for_device("cpu").max_pixels == 1024 * 1024
    assert Limits.for_device("cuda").max_pixels == 4096 * 4096
    monkeypatch.setenv("LORA_STUDIO_MAX_STEPS", "40")
    monkeypatch.setenv("LORA_STUDIO_MAX_UPLOAD_MB", "10")
    limits = Limits.for_device("cpu", max_loras=3)
    assert (limits.max_steps, limits.max_upload_bytes, limits.max_loras) == (40, 10 << 20, 3)
    monkeypatch.setenv("LORA_STUDIO_MAX_STEPS", "lots")
    with pytest.raises(StudioError, match="LORA_STUDIO_MAX_STEPS"):
        Limits.for_device("cpu")
    monkeypatch.delenv("LORA_STUDIO_MAX_STEPS")
    with pytest.raises(StudioError, match="max_pixels"):
        Limits.for_device("cpu", max_pixels=-5)


@pytest.mark.parametrize("request_over, limit, option, low", [
    ({"width": 128, "height": 128}, "max_pixels", "--max-pixels", 64 * 64),
    ({"steps": 11}, "max_steps", "--max-steps", 10),
    ({"loras": 4}, "max_loras", "--max-loras", 3),
    ({"seeds": 4}, "max_images", "--max-images", 3),
])
def test_a_request_over_a_limit_is_refused_before_anything_runs(request_over, limit, option, low, tiny_pipe,
                                                                tiny_folder, good_lora, tmp_path):
    studio = Studio(tiny_pipe, limits=Limits.for_device("cpu", **{limit: low}))
    composition = composition_with(good_lora)
    composition["loras"] = composition["loras"] * request_over.get("loras", 1)
    composition.update({k: v for k, v in request_over.items() if k in ("width", "height", "steps")})
    steps_run = []
    seeds = list(range(request_over.get("seeds", 1)))
    with pytest.raises(StudioError) as error:
        studio.generate(composition, seeds=seeds, callback=lambda step: steps_run.append(step.step))
    message = str(error.value)
    assert f"`{limit}`" in message and option in message and "LORA_STUDIO_" in message and message.endswith(")."), message
    assert steps_run == [] and lora_layers(tiny_pipe) == {}

    preset = tmp_path / "big.json"
    preset.write_text(json.dumps(composition))
    args = ["generate", str(preset), "--model", str(tiny_folder)]
    if "seeds" in request_over:
        args += ["--seeds", f"0-{request_over['seeds'] - 1}"]
    result = runner.invoke(app, [*args, option, str(low), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"`{limit}`" in result.output and "denoising" not in result.output
    assert not (tmp_path / "out").exists()
    raised = runner.invoke(app, [*args, option, str(low * 100), "--out", str(tmp_path / "ok")])
    assert raised.exit_code == 0, raised.output


def test_a_batch_with_an_item_over_a_limit_writes_nothing(tiny_folder, good_lora, tmp_path):
    manifest = tmp_path / "batch.json"
    manifest.write_text(json.dumps({"items": [{"composition": composition_with(good_lora)},
                                              {"composition": {**composition_with(good_lora), "steps": 400}}]}))
    result = runner.invoke(app, ["batch", str(manifest), "--model", str(tiny_folder), "--out", str(tmp_path / "out"),
                                 "--max-steps", "100"])
    assert result.exit_code == 2 and "item 2" in result.output and "`max_steps`" in result.output
    assert not (tmp_path / "out").exists()


# --- the web studio's confined library --------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_state(tiny_folder, tiny_loras, tmp_path_factory):
    from studio.webapp import StudioState

    library = tmp_path_factory.mktemp("weblibrary")
    shutil.copy(tiny_loras["alpha"], library / "alpha.safetensors")
    return StudioState(str(tiny_folder), library=str(library), limits=Limits.for_device("cpu", max_upload_bytes=2 << 20))


@pytest.mark.parametrize("file", ["../../etc/passwd", "/etc/passwd", "../../../../../../etc/hostname",
                                  "sub/../../outside.safetensors", "~/.bashrc"])
def test_the_web_studio_refuses_files_outside_its_folders(file, web_state):
    from studio.spec import parse_composition

    with pytest.raises(StudioError) as error:
        web_state.studio.library.resolve_files(parse_composition(composition_with(Path(file))))
    assert f"The LoRA {Path(file)} is outside the studio's LoRA folders" in str(error.value)
    with pytest.raises(StudioError):
        web_state.generate(parse_composition(composition_with(Path(file))), "visitor")


def test_the_web_studio_takes_library_files_by_name_or_path_and_masks_only_embedded(web_state, tiny_loras, tmp_path):
    from studio.spec import parse_composition

    library = web_state.studio.library
    resolved = library.resolve_files(parse_composition(composition_with(Path("alpha.safetensors"))))
    assert Path(resolved.loras[0].file).parent == Path(library.library)
    inside = library.resolve_files(parse_composition(composition_with(Path(library.library) / "alpha.safetensors")))
    assert inside.loras[0].file == resolved.loras[0].file
    # a same-named file elsewhere is never opened: the library's own is used
    elsewhere = library.resolve_files(parse_composition(composition_with(tiny_loras["alpha"])))
    assert Path(elsewhere.loras[0].file).parent == Path(library.library)
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    masked = composition_with(Path("alpha.safetensors"))
    masked["loras"][0]["region"] = {"mask": str(tmp_path / "mask.png")}
    with pytest.raises(StudioError, match="mask of alpha.safetensors is a file outside"):
        library.resolve_files(parse_composition(masked))


def test_uploads_go_into_the_library_within_the_size_limit(web_state, tiny_loras, tmp_path):
    kept = web_state.upload(str(tiny_loras["beta"]))
    assert kept.parent == web_state.upload_folder and kept.name == "beta.safetensors"
    assert any(path == str(kept) for path in web_state.lora_files().values())
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(StudioError, match="`max_upload_bytes`"):
        web_state.upload(str(big))
    with pytest.raises(StudioError, match="not a .safetensors file"):
        web_state.upload(str(tiny_loras["beta"]), name="beta.pt")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_loras["gamma"].read_bytes()[:5000])
    with pytest.raises(StudioError, match="truncated"):
        web_state.upload(str(truncated))
    assert not (web_state.upload_folder / "cut.safetensors").exists()
    assert [p.name for p in (web_state.upload_folder / ".staging").iterdir()] == []


def test_serving_opens_no_file_outside_the_allowed_folders(web_state, tmp_path):
    """Python's audit hook sees every open(): a request naming outside files opens none of them."""
    from studio.spec import parse_composition

    opened = []
    watching = [False]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(Path(web_state.studio.library.library) / "alpha.safetensors", outside / "secret.safetensors")
    Image.new("L", (8, 8), 255).save(outside / "mask.png")
    requests = [composition_with(outside / "secret.safetensors"), composition_with(Path("../outside/secret.safetensors")),
                {**composition_with(Path("alpha.safetensors")),
                 "loras": [{"file": "alpha.safetensors", "region": {"mask": str(outside / "mask.png")}}]}]
    watching[0] = True
    try:
        for request in requests:
            with pytest.raises(StudioError):
                web_state.generate(parse_composition(request), "visitor")
    finally:
        watching[0] = False
    assert not [path for path in opened if str(outside) in os.path.abspath(path)], opened


# --- nothing lost -----------------------------------------------------------------------------------------


def test_a_writer_killed_between_write_and_rename_leaves_the_previous_preset(tmp_path):
    from studio.files import remove_partial_files
    from studio.spec import load_preset

    preset = tmp_path / "preset.json"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from studio.spec import Composition, save_preset
        save_preset(Composition(prompt="version one"), {str(preset)!r})
        real_replace = os.replace
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies after writing, before renaming
        save_preset(Composition(prompt="version two"), {str(preset)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL
    assert load_preset(preset).prompt == "version one"
    leftovers = [p for p in tmp_path.iterdir() if p != preset]
    assert len(leftovers) == 1 and "version two" in leftovers[0].read_text()
    assert remove_partial_files(tmp_path) == 1 and list(tmp_path.iterdir()) == [preset]
