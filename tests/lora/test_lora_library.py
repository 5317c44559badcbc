"""The LoRA library folder and the hashes it shows: every file listed, unusable ones with their reason;
A1111/Civitai hashes computed once and cached by (path, size, mtime)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from studio.lora import hashes, inspect_lora, library_folder, scan_library

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_STUDIO_LORAS", raising=False)


def small_lora(path, metadata=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    save_file({f"{KEY}.lora_down.weight": torch.randn(4, 768, generator=gen),
               f"{KEY}.lora_up.weight": torch.randn(320, 4, generator=gen), f"{KEY}.alpha": torch.tensor(4.0)},
              str(path), metadata=metadata)
    return path


def test_hashes_match_what_a1111_and_civitai_compute(tmp_path):
    path = small_lora(tmp_path / "style.safetensors", {"ss_output_name": "style"})
    data = path.read_bytes()
    tensors_start = 8 + int.from_bytes(data[:8], "little")
    info = inspect_lora(path)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.model_hash == info.sha256[:10]
    assert info.short_hash == hashlib.sha256(data[tensors_start:]).hexdigest()[:12]

    edited = small_lora(tmp_path / "edited.safetensors", {"ss_output_name": "a different name, same tensors"})
    other = inspect_lora(edited)
    assert other.short_hash == info.short_hash and other.sha256 != info.sha256


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = small_lora(tmp_path / "cached.safetensors")
    first = inspect_lora(path)
    cache_file = tmp_path / "cache" / hashes.CACHE_FILE
    assert not cache_file.exists()  # inspection reads the header only; hashes wait until asked for
    first.sha256
    assert str(path.resolve()) in json.loads(cache_file.read_text())

    def no_hashing(*_args):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(hashes, "_compute", no_hashing)
    assert inspect_lora(path).sha256 == first.sha256

    small_lora(path, seed=1)  # new content: the size is the same, the mtime is not
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="cache should have answered"):
        inspect_lora(path).sha256
    monkeypatch.undo()
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    assert inspect_lora(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first.sha256


def test_an_unwritable_cache_only_costs_rehashing(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(blocker))
    path = small_lora(tmp_path / "x.safetensors")
    assert inspect_lora(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_library_lists_every_file_with_unusable_ones_explained(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    small_lora(folder / "hero.safetensors", {"modelspec.trigger_phrase": "hero_tok", "ss_base_model_version": "sd_v1"})
    small_lora(folder / "styles" / "ink.safetensors")
    torch.save({f"{KEY}.lora_down.weight": torch.zeros(4, 768)}, folder / "old.ckpt")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 4)
    (folder / "notes.txt").write_text("not a LoRA")

    entries = scan_library(folder)
    assert [e.path.relative_to(folder).as_posix() for e in entries] == [
        "broken.safetensors", "hero.safetensors", "old.ckpt", "styles/ink.safetensors"]
    by_name = {e.name: e for e in entries}
    assert by_name["hero.safetensors"].usable and by_name["hero.safetensors"].info.trigger_words == ["hero_tok"]
    assert by_name["ink.safetensors"].info.base_model == "SD1.x"
    assert not by_name["old.ckpt"].usable and "can execute code" in by_name["old.ckpt"].error
    assert not by_name["broken.safetensors"].usable and by_name["broken.safetensors"].error.startswith("broken.safetensors")
    listed = json.loads(json.dumps([e.to_json() for e in entries]))
    assert [item["usable"] for item in listed] == [False, True, False, True]
    assert listed[2] == {"usable": False, "path": str(folder / "old.ckpt"), "name": "old.ckpt",
                         "error": by_name["old.ckpt"].error}


def test_library_folder_defaults_and_overrides(tmp_path, monkeypatch):
    assert library_folder() == tmp_path / "cache" / "loras"
    assert scan_library() == []  # an absent folder is an empty library
    monkeypatch.setenv("LORA_STUDIO_LORAS", str(tmp_path / "mine"))
    assert library_folder() == tmp_path / "mine"
    assert library_folder(tmp_path / "given") == tmp_path / "given"


def test_two_processes_hashing_at_once_both_keep_their_entries(tmp_path):
    import subprocess
    import sys

    files = [small_lora(tmp_path / f"f{i}.safetensors", seed=i) for i in range(12)]
    script = ("import sys; from pathlib import Path; from studio.lora.inspect import inspect_lora\n"
              "for p in sys.argv[1:]: inspect_lora(Path(p)).sha256")
    env = {**os.environ, "LORA_STUDIO_CACHE": str(tmp_path / "cache")}
    writers = [subprocess.Popen([sys.executable, "-c", script, *map(str, files[k::2])], env=env) for k in (0, 1)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    cached = json.loads((tmp_path / "cache" / hashes.CACHE_FILE).read_text())
    assert {str(p.resolve()) for p in files} <= set(cached)


def test_a_rescan_reads_only_new_or_changed_files_and_never_hashes(tmp_path, monkeypatch):
    from studio.lora import library
    from studio.lora.inspect import inspect_lora as real_inspect

    folder = tmp_path / "lib"
    folder.mkdir()
    for i in range(3):
        small_lora(folder / f"l{i}.safetensors", seed=i)
    monkeypatch.setattr(hashes, "_compute", lambda *_a: (_ for _ in ()).throw(AssertionError("hashed on a scan")))
    first = library.scan_library(folder)
    assert [e.name for e in first] == ["l0.safetensors", "l1.safetensors", "l2.safetensors"]
    assert all(e.usable and "sha256" not in e.to_json(hashes=False) for e in first)
    reads = []
    monkeypatch.setattr(library, "inspect_lora", lambda p: reads.append(p.name) or real_inspect(p))
    assert library.scan_library(folder) == first and reads == []
    small_lora(folder / "l1.safetensors", seed=7)
    stat = (folder / "l1.safetensors").stat()
    os.utime(folder / "l1.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (folder / "l2.safetensors").unlink()
    again = library.scan_library(folder)
    assert reads == ["l1.safetensors"] and [e.name for e in again] == ["l0.safetensors", "l1.safetensors"]
