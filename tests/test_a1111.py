"""A1111 interop (studio/a1111.py): infotexts read back by A1111's own parser (re-implemented below from
stable-diffusion-webui v1.10.1), sampler names, hashes, <lora:…> tags, LoRA lookup, Regional Prompter
regions."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from studio.a1111 import (A1111_SAMPLERS, GenerationParameters, LoraTag, Region, addnet_hash, autov2_hash,
                          effective_lora_weights, infotext, infotext_sampler, lora_short_hash, lora_tag,
                          parse_lora_tags, quote, resolve_lora_name, sampler_from_infotext, split_regions,
                          split_sampler_name)
from studio.errors import LoraError, PresetError

# ---------------------------------------------------- A1111 v1.10.1 modules/infotext_utils.py, re-implemented

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    """infotext_utils.parse_generation_parameters without its UI parts (styles, defaults for absent fields,
    hires back-compat, skipped fields)."""
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = a1111_unquote(v)
            m = RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            pass
    return res


def params(**overrides) -> GenerationParameters:
    base = dict(prompt="a photo of a cat", steps=20, sampler="Euler a", cfg_scale=7.0, seed=42, width=512, height=512)
    return GenerationParameters(**{**base, **overrides})


# ------------------------------------------------------------------ quote


@pytest.mark.parametrize("value, written", [
    ("plain words", "plain words"),
    ("a, b", '"a, b"'),
    ("ratio 2:3", '"ratio 2:3"'),
    ("two\nlines", '"two\\nlines"'),
    ('say "hi"', 'say "hi"'),  # quotes alone do not trigger quoting
    ('x, "y"', '"x, \\"y\\""'),
    ("café, crème", '"café, crème"'),  # ensure_ascii=False
    (7.5, "7.5"),
    (True, "True"),
    (["a", "b"], '["a", "b"]'),  # the object is json-dumped, as A1111 does
    ("", ""),
])
def test_quote_follows_a1111(value, written):
    assert quote(value) == written


# ------------------------------------------------------------------ infotext, byte for byte


def test_infotext_byte_for_byte():
    p = params(prompt="masterpiece, 1girl", negative_prompt="lowres, bad hands", steps=28, sampler="DPM++ 2M Karras",
               seed=1234, width=512, height=768, model_hash="6ce0161689", model="v1-5-pruned-emaonly",
               lora_hashes={"detail": "0123456789ab", "style:v2": "ba9876543210"},
               extra={"Clip skip": 2, "Denoising strength": 0.7, "Hires upscale": 2, "Hires upscaler": "Latent"})
    assert p.infotext() == (
        "masterpiece, 1girl\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
        'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "detail: 0123456789ab, stylev2: ba9876543210"')


def test_infotext_minimal_and_version():
    assert params().infotext() == ("a photo of a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, "
                                   "CFG scale: 7, Seed: 42, Size: 512x512")
    assert params(cfg_scale=7.5, version="v1.10.1").infotext().endswith("CFG scale: 7.5, Seed: 42, Size: 512x512, "
                                                                        "Version: v1.10.1")
    # Version is A1111's own late key: an `extra` Version is overridden by version= (None: dropped), as in A1111
    assert "Version" not in params(extra={"Version": "x"}).infotext()


def test_infotext_low_level_rules():
    # None dropped, a value equal to its key written bare, negative line only when non-empty, whole text stripped
    assert infotext("  p ", "", {"A": 1, "B": None, "Tiling": "Tiling", "C": "x:y"}) == 'p \nA: 1, Tiling, C: "x:y"'
    assert infotext("p", "n", {"A": 1}) == "p\nNegative prompt: n\nA: 1"


def test_extra_field_named_like_an_a1111_field_takes_a1111s_place():
    text = params(model="m", extra={"Hires steps": 10, "Clip skip": 2}).infotext()
    assert text.index("Model: m") < text.index("Clip skip: 2") < text.index("Hires steps: 10")


def a1111_create_infotext(prompt, negative_prompt, steps, sampler_name, scheduler, cfg_scale, seed, width, height,
                          sd_model_hash, sd_model_name, extra_generation_params, version=None):
    """processing.create_infotext for a txt2img run with A1111's default options (model hash and name on,
    everything else off or at its default), transcribed from its dict literal."""
    generation_params = {
        "Steps": steps, "Sampler": sampler_name, "Schedule type": scheduler, "CFG scale": cfg_scale,
        "Image CFG scale": None, "Seed": seed, "Face restoration": None, "Size": f"{width}x{height}",
        "Model hash": sd_model_hash, "Model": sd_model_name, "FP8 weight": None, "Cache FP16 weight for LoRA": None,
        "VAE hash": None, "VAE": None, "Variation seed": None, "Variation seed strength": None,
        "Seed resize from": None, "Denoising strength": extra_generation_params.get("Denoising strength"),
        "Conditional mask weight": None, "Clip skip": None, "ENSD": None, "Token merging ratio": None,
        "Token merging ratio hr": None, "Init image hash": None, "RNG": None, "Tiling": None,
        **extra_generation_params,
        "Version": version, "User": None,
    }
    generation_params_text = ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in generation_params.items()
                                        if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_prompt_text}\n{generation_params_text}".strip()


@pytest.mark.parametrize("sampler", list(A1111_SAMPLERS))
@pytest.mark.parametrize("extra", [{}, {"Denoising strength": 0.5, "Hires upscale": 1.5, "Clip skip": 2}])
def test_same_text_as_a1111s_create_infotext(sampler, extra):
    a_sampler, a_schedule = infotext_sampler(sampler)
    hashes = {"one": "111111111111", "two": "222222222222"}
    ours = params(prompt="x, y", negative_prompt="z", sampler=sampler, cfg_scale=6.5, model_hash="abcdef0123",
                  model="base, v2", lora_hashes=hashes, extra=extra, version="v0").infotext()
    theirs = a1111_create_infotext("x, y", "z", 20, a_sampler, a_schedule, 6.5, 42, 512, 512, "abcdef0123",
                                   "base, v2", {**extra, "Lora hashes": "one: 111111111111, two: 222222222222"},
                                   version="v0")
    assert ours == theirs


# ------------------------------------------------------------------ round trips through A1111's parser

ROUND_TRIPS = {
    "plain": dict(prompt="a cat", negative_prompt="blurry"),
    "commas and colons": dict(prompt="a cat, (sitting:1.2), [dog:cat:0.5]", negative_prompt="bad: hands, lowres"),
    "quotes": dict(prompt='a sign saying "hello, world"', negative_prompt='"text", watermark'),
    "newlines": dict(prompt="line one,\nline two: more\nline three", negative_prompt="neg one\nneg: two"),
    "no negative": dict(prompt="just a prompt, with: colon"),
    "model with a comma": dict(prompt="p", model="my model, v2 (final)", model_hash="0123456789"),
    "model with quotes and comma": dict(prompt="p", model='the "best", model'),
    "unicode": dict(prompt="café, naïve", model="modèle: un"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip(case):
    p = params(**ROUND_TRIPS[case])
    parsed = parse_generation_parameters(p.infotext())
    assert parsed["Prompt"] == p.prompt
    assert parsed["Negative prompt"] == p.negative_prompt
    assert parsed["Steps"] == "20" and parsed["CFG scale"] == "7" and parsed["Seed"] == "42"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert parsed["Sampler"] == "Euler a" and parsed["Schedule type"] == "Automatic"
    if p.model:
        assert parsed["Model"] == p.model
    if p.model_hash:
        assert parsed["Model hash"] == p.model_hash


def test_round_trip_lora_hashes_and_extras():
    p = params(width=640, height=896, lora_hashes={"first lora": "aaaaaaaaaaaa", "second": "bbbbbbbbbbbb"},
               extra={"Hires upscaler": "R-ESRGAN 4x+", "RP Ratios": "1,2;1", "RP Active": True})
    parsed = parse_generation_parameters(p.infotext())
    assert parsed["Lora hashes"] == "first lora: aaaaaaaaaaaa, second: bbbbbbbbbbbb"
    assert dict(pair.split(": ") for pair in parsed["Lora hashes"].split(", ")) == {
        "first lora": "aaaaaaaaaaaa", "second": "bbbbbbbbbbbb"}
    assert (parsed["Size-1"], parsed["Size-2"]) == ("640", "896")
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+" and parsed["RP Ratios"] == "1,2;1"
    assert parsed["RP Active"] == "True"


@pytest.mark.parametrize("sampler", list(A1111_SAMPLERS))
def test_every_sampler_round_trips(sampler):
    parsed = parse_generation_parameters(params(sampler=sampler).infotext())
    assert (parsed["Sampler"], parsed["Schedule type"]) == infotext_sampler(sampler)
    assert sampler_from_infotext(parsed["Sampler"], parsed["Schedule type"]) == sampler


def test_karras_is_written_as_a_schedule_type():
    parsed = parse_generation_parameters(params(sampler="DPM++ 2M Karras").infotext())
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    parsed = parse_generation_parameters(params(sampler="DPM++ SDE Karras").infotext())
    assert parsed["Sampler"] == "DPM++ SDE" and parsed["Schedule type"] == "Karras"
    # plain DPM++ 2M must not say Automatic: A1111 >= 1.9 runs DPM++ 2M on Automatic with Karras sigmas
    assert parse_generation_parameters(params(sampler="DPM++ 2M").infotext())["Schedule type"] == "Uniform"


def test_explicit_schedule_type_is_written_as_given():
    text = params(sampler="DPM++ 2M SDE", schedule_type="Exponential").infotext()
    assert "Sampler: DPM++ 2M SDE, Schedule type: Exponential," in text


# ------------------------------------------------------------------ sampler names


def test_sampler_table():
    assert set(A1111_SAMPLERS) == {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC",
                                   "DDIM", "LCM"}
    assert A1111_SAMPLERS["DPM++ 2M Karras"] == ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    assert A1111_SAMPLERS["DPM++ SDE Karras"] == ("DPMSolverSDEScheduler", {"use_karras_sigmas": True})
    with pytest.raises(PresetError, match="not a sampler"):
        infotext_sampler("Heun")


def test_sampler_table_names_exist_in_diffusers():
    """Each class and each config key, found in the installed diffusers' source without importing it (no torch)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        pytest.skip("diffusers is not installed")
    sources = {p: p.read_text() for p in (Path(spec.origin).parent / "schedulers").glob("scheduling_*.py")}
    for cls, kwargs in A1111_SAMPLERS.values():
        defining = [text for text in sources.values() if re.search(rf"^class {cls}\(", text, re.M)]
        assert defining, cls
        for key in kwargs:
            assert re.search(rf"\b{key}\s*:", defining[0]), (cls, key)


@pytest.mark.parametrize("sampler, schedule, ours", [
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111's default schedule for DPM++ 2M
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Uniform", "DPM++ 2M"),
    ("DPM++ 2M", None, "DPM++ 2M"),  # no Schedule type field: written before 1.9, when this meant non-Karras
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # pre-1.9 combined name
    ("DPM++ SDE Karras", None, "DPM++ SDE Karras"),
    ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
    ("DPM++ SDE", "Uniform", None),
    ("DPM++ 2M", "Exponential", None),
    ("Euler", "Karras", None),
    ("Euler a", "Automatic", "Euler a"),
    ("Euler", "Uniform", "Euler"),
    ("DDIM", "Karras", "DDIM"),  # timestep samplers ignore the schedule type
    ("UniPC", "Automatic", "UniPC"),
    ("LCM", "Automatic", "LCM"),
    ("Heun", "Automatic", None),
])
def test_sampler_from_infotext(sampler, schedule, ours):
    assert sampler_from_infotext(sampler, schedule) == ours


def test_split_sampler_name_like_get_sampler_and_scheduler():
    assert split_sampler_name("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")
    assert split_sampler_name("DPM++ 2M karras", "Uniform") == ("DPM++ 2M", "Karras")  # the suffix wins
    assert split_sampler_name("Euler SGMUniform") == ("Euler", "SGM Uniform")
    assert split_sampler_name("Euler a") == ("Euler a", "Automatic")
    assert split_sampler_name("Euler", "exponential") == ("Euler", "Exponential")
    assert split_sampler_name("Euler", "no such schedule") == ("Euler", "Automatic")


# ------------------------------------------------------------------ hashes


def write_safetensors(path: Path, metadata: dict, tensor_bytes: bytes) -> bytes:
    header = {"w": {"dtype": "U8", "shape": [len(tensor_bytes)], "data_offsets": [0, len(tensor_bytes)]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + tensor_bytes
    path.write_bytes(data)
    return data


def test_hashes_of_a_small_safetensors_file(tmp_path):
    tensors = bytes(range(256)) * 3
    data = write_safetensors(tmp_path / "a.safetensors", {"ss_output_name": "a"}, tensors)
    assert autov2_hash(tmp_path / "a.safetensors") == hashlib.sha256(data).hexdigest()[:10]
    assert addnet_hash(tmp_path / "a.safetensors") == hashlib.sha256(tensors).hexdigest()
    # the metadata is outside the addnet hash, inside the model hash
    write_safetensors(tmp_path / "b.safetensors", {"ss_output_name": "something else entirely"}, tensors)
    assert addnet_hash(tmp_path / "b.safetensors") == addnet_hash(tmp_path / "a.safetensors")
    assert autov2_hash(tmp_path / "b.safetensors") != autov2_hash(tmp_path / "a.safetensors")
    assert lora_short_hash(tmp_path / "a.safetensors") == hashlib.sha256(tensors).hexdigest()[:12]


def test_hashes_across_block_boundaries(tmp_path):
    tensors = hashlib.sha256(b"seed").digest() * (80 * 1024 + 7)  # ~2.5 MiB, not a multiple of the 1 MiB block
    data = write_safetensors(tmp_path / "big.safetensors", {}, tensors)
    assert autov2_hash(tmp_path / "big.safetensors") == hashlib.sha256(data).hexdigest()[:10]
    assert addnet_hash(tmp_path / "big.safetensors") == hashlib.sha256(tensors).hexdigest()


def test_lora_short_hash_prefers_the_trainers_hash_and_hashes_pickles_whole(tmp_path):
    stored = "f" * 64
    write_safetensors(tmp_path / "k.safetensors", {"sshs_model_hash": stored}, b"\x00" * 16)
    assert lora_short_hash(tmp_path / "k.safetensors") == stored[:12]
    (tmp_path / "old.pt").write_bytes(b"pickle bytes")
    assert lora_short_hash(tmp_path / "old.pt") == hashlib.sha256(b"pickle bytes").hexdigest()[:12]


def test_known_sha256_vector(tmp_path):
    (tmp_path / "abc.ckpt").write_bytes(b"abc")
    assert autov2_hash(tmp_path / "abc.ckpt") == "ba7816bf8f"  # FIPS 180-2 test vector sha256("abc")


# ------------------------------------------------------------------ lora tags


@pytest.mark.parametrize("tag, expected", [
    ("<lora:x>", LoraTag("x", 1.0, 1.0)),
    ("<lora:x:0.8>", LoraTag("x", 0.8, 0.8)),
    ("<lora:x:0.5:1.2>", LoraTag("x", 0.5, 1.2)),
    ("<lora:x:te=0.5:unet=0.8>", LoraTag("x", 0.5, 0.8)),
    ("<lora:x:te=0.5>", LoraTag("x", 0.5, 0.5)),  # unet defaults to te, named te included
    ("<lora:x:unet=0.3>", LoraTag("x", 1.0, 0.3)),
    ("<lora:x:0.7:unet=0.2>", LoraTag("x", 0.7, 0.2)),
    ("<lora:x:-1>", LoraTag("x", -1.0, -1.0)),
    ("<lora:my lora v2.1:1e-1>", LoraTag("my lora v2.1", 0.1, 0.1)),
    ("<lyco:x:0.6>", LoraTag("x", 0.6, 0.6)),  # A1111 registers lyco as an alias of lora
])
def test_lora_tag_weights(tag, expected):
    assert parse_lora_tags(f"a {tag} b") == ("a  b", [expected])


def test_tags_are_removed_like_a1111():
    text, tags = parse_lora_tags("1girl, <lora:a:0.5>, smile <hypernet:h:1> <lora:b>,<x y> <lora:>")
    assert text == "1girl, , smile  ,<x y> <lora:>"  # every <word:args> tag goes, nothing else is touched
    assert [t.name for t in tags] == ["a", "b"]


def test_two_tags_for_one_file_are_kept_and_applied_like_a1111():
    _, tags = parse_lora_tags("<lora:x:0.5> <lora:y> <lora:x:0.8:0.4>")
    assert tags == [LoraTag("x", 0.5, 0.5), LoraTag("y", 1.0, 1.0), LoraTag("x", 0.8, 0.4)]
    # A1111 applies the same network object once per tag, with the last tag's multipliers
    assert effective_lora_weights(tags) == {"x": (1.6, 0.8), "y": (1.0, 1.0)}


@pytest.mark.parametrize("tag, message", [
    ("<lora:x:abc>", r"The LoRA tag <lora:x:abc> has the weight 'abc', which is not a number\."),
    ("<lora:x:>", "has the weight ''"),
    ("<lora:x:nan>", "has the weight 'nan'"),
    ("<lora:x:te=high>", "has the weight 'high'"),
    ("<lora:x:1:1:8>", "DyLoRA"),
    ("<lora:x:1:dyn=8>", "DyLoRA"),
    ("<lora:x:1:lbw=ALL>", "lbw="),
    ("<lora::1>", "names no LoRA"),
])
def test_bad_tags_are_refused_with_one_sentence(tag, message):
    with pytest.raises(PresetError, match=message) as info:
        parse_lora_tags(f"a {tag}")
    assert tag in str(info.value) and str(info.value).count(". ") == 0


def test_lora_tag_writer_round_trips():
    assert lora_tag("x") == "<lora:x:1>"
    assert lora_tag("x", 0.8) == "<lora:x:0.8>"
    assert lora_tag("x", 0.5, 0.5) == "<lora:x:0.5>"
    assert lora_tag("my lora", 0.5, 1.0) == "<lora:my lora:0.5:1>"
    for name, te, unet in [("a", 0.1, None), ("b c", 1.25, 0.3), ("d", -0.5, -0.5), ("e", 0.123456789, 2.0)]:
        _, (tag,) = parse_lora_tags(lora_tag(name, te, unet))
        assert tag == LoraTag(name, te, te if unet is None else unet)
    for bad in ["a:b", "a>b", "k=v", "", " x"]:
        with pytest.raises(PresetError):
            lora_tag(bad)


# ------------------------------------------------------------------ lora lookup


@pytest.fixture
def lora_folders(tmp_path):
    first, second = tmp_path / "Lora", tmp_path / "LyCORIS"
    for rel in ["Foo.safetensors", "styles/bar.pt", "x/2/dup.ckpt", "x/10/dup.ckpt", "Amb.pt", "amb.ckpt",
                "notes.txt", "upper.SAFETENSORS"]:
        (first / rel).parent.mkdir(parents=True, exist_ok=True)
        (first / rel).write_bytes(b"\x00")
    second.mkdir()
    write_safetensors(second / "file_name_v3.safetensors", {"ss_output_name": "nice alias"}, b"\x01" * 8)
    return [first, second]


def test_resolve_by_stem_alias_and_case(lora_folders):
    first, second = lora_folders
    assert resolve_lora_name("Foo", lora_folders) == first / "Foo.safetensors"
    assert resolve_lora_name("bar", lora_folders) == first / "styles" / "bar.pt"
    assert resolve_lora_name("upper", lora_folders) == first / "upper.SAFETENSORS"
    assert resolve_lora_name("dup", lora_folders) == first / "x" / "10" / "dup.ckpt"  # last in natural order
    assert resolve_lora_name("nice alias", lora_folders) == second / "file_name_v3.safetensors"
    assert resolve_lora_name("file_name_v3", lora_folders) == second / "file_name_v3.safetensors"
    assert resolve_lora_name("foo", lora_folders) == first / "Foo.safetensors"  # case-insensitive fallback
    assert resolve_lora_name("Amb", lora_folders) == first / "Amb.pt"  # exact case first


def test_resolve_errors_name_the_folders(lora_folders, tmp_path):
    with pytest.raises(LoraError) as info:
        resolve_lora_name("nope", [*lora_folders, tmp_path / "missing"])
    message = str(info.value)
    assert message.startswith("No LoRA named 'nope' in ") and str(lora_folders[0]) in message
    assert str(tmp_path / "missing") in message and message.endswith(").")
    with pytest.raises(LoraError, match="Amb, amb"):
        resolve_lora_name("AMB", lora_folders)
    with pytest.raises(LoraError, match="notes"):
        resolve_lora_name("notes", lora_folders)


# ------------------------------------------------------------------ Regional Prompter regions

THIRD = 1 / 3


def boxes(result):
    return [tuple(round(v, 9) for v in region.box) for region in result.regions]


def r(*values):
    return tuple(round(v, 9) for v in values)


def test_readme_2d_example():
    """Regional Prompter's README: Columns, Divide Ratio 1,2,1,1;2,4,6."""
    prompt = ("(blue sky:1.2) ADDCOL\ngreen hair twintail ADDCOL\n(aquarium:1.3) ADDROW\n(messy desk:1.2) ADDCOL\n"
              "orange dress and sofa")
    result = split_regions(prompt, "columns", "1,2,1,1;2,4,6")
    assert [reg.prompt for reg in result.regions] == ["(blue sky:1.2)", "green hair twintail", "(aquarium:1.3)",
                                                      "(messy desk:1.2)", "orange dress and sofa"]
    assert boxes(result) == [r(0, 0, 0.5, THIRD), r(0.5, 0, 0.75, THIRD), r(0.75, 0, 1, THIRD),
                             r(0, THIRD, 0.4, 1), r(0.4, THIRD, 1, 1)]
    assert result.common is None and result.base is None


def test_readme_common_example():
    """README "Use common prompt": the first part is added to every region."""
    prompt = "best quality, 20yo lady in garden BREAK\ngreen hair twintail BREAK\nred blouse BREAK\nblue skirt"
    result = split_regions(prompt, "rows", "1,1,1", use_common=True)
    assert result.common == "best quality, 20yo lady in garden"
    assert [reg.prompt for reg in result.regions] == [
        "best quality, 20yo lady in garden, green hair twintail", "best quality, 20yo lady in garden, red blouse",
        "best quality, 20yo lady in garden, blue skirt"]
    assert boxes(result) == [r(0, 0, 1, THIRD), r(0, THIRD, 1, 2 * THIRD), r(0, 2 * THIRD, 1, 1)]


def test_addcomm_addrow_addcol_with_overflowing_ratios():
    """README "visualize" prompt with the ratio 1,1;2,3,2;3,2,3: the second group has one cell, so its extra number
    overflows and becomes the third row's size (split_l2's broadcast rules)."""
    prompt = ("fantasy ADDCOMM\nsky ADDROW\ncastle ADDROW\nstreet stalls ADDCOL\n2girls eating and walking on street "
              "ADDCOL\nstreet stalls")
    equal = split_regions(prompt, "columns")
    assert equal.common == "fantasy"
    assert [reg.prompt for reg in equal.regions][:2] == ["fantasy, sky", "fantasy, castle"]
    assert boxes(equal) == [r(0, 0, 1, THIRD), r(0, THIRD, 1, 2 * THIRD), r(0, 2 * THIRD, THIRD, 1),
                            r(THIRD, 2 * THIRD, 2 * THIRD, 1), r(2 * THIRD, 2 * THIRD, 1, 1)]
    ratios = split_regions(prompt, "columns", "1,1;2,3,2;3,2,3")
    assert boxes(ratios) == [r(0, 0, 1, 0.2), r(0, 0.2, 1, 0.6), r(0, 0.6, THIRD, 1), r(THIRD, 0.6, 2 * THIRD, 1),
                             r(2 * THIRD, 0.6, 1, 1)]


def test_break_is_the_modes_inner_separator():
    assert boxes(split_regions("a BREAK b", "columns", "1,3")) == [r(0, 0, 0.25, 1), r(0.25, 0, 1, 1)]
    assert boxes(split_regions("a BREAK b", "rows", "1,3")) == [r(0, 0, 1, 0.25), r(0, 0.25, 1, 1)]
    assert boxes(split_regions("a BREAK b BREAK c")) == [r(0, 0, THIRD, 1), r(THIRD, 0, 2 * THIRD, 1),
                                                         r(2 * THIRD, 0, 1, 1)]
    assert [reg.prompt for reg in split_regions("left AND right").regions] == ["left", "right"]  # AND is BREAK


def test_without_ratios_breaks_split_the_modes_inner_direction():
    """The example of docs/a1111.md: an ADDROW grid whose second row is split by a BREAK."""
    result = split_regions("a castle on a hill ADDCOMM\nstormy sky ADDROW\nred banner BREAK\ngreen banner")
    assert [reg.prompt for reg in result.regions] == [
        "a castle on a hill, stormy sky", "a castle on a hill, red banner", "a castle on a hill, green banner"]
    assert boxes(result) == [r(0, 0, 1, 0.5), r(0, 0.5, 0.5, 1), r(0.5, 0.5, 1, 1)]
    rows = split_regions("sky ADDCOL left BREAK right", "rows")
    assert boxes(rows) == [r(0, 0, 0.5, 1), r(0.5, 0, 1, 0.5), r(0.5, 0.5, 1, 1)]


def test_2d_ratios_turn_breaks_into_rows_and_columns():
    # columns mode: ';' separates rows; each group's first number is the row's height
    result = split_regions("a BREAK b BREAK c", "columns", "1,1;2,1,3")
    assert boxes(result) == [r(0, 0, 1, THIRD), r(0, THIRD, 0.25, 1), r(0.25, THIRD, 1, 1)]
    # rows mode: ',' separates columns and ';' rows within a column
    result = split_regions("a BREAK b BREAK c", "rows", "1;1;2,1;1")
    assert boxes(result) == [r(0, 0, 0.5, THIRD), r(0, THIRD, 0.5, 1), r(0.5, 0, 1, 1)]


def test_base_prompt_and_base_ratios():
    result = split_regions("night, castle ADDBASE left tower BREAK right tower")
    assert result.base == "night, castle" and result.base_weights == (0.2, 0.2)  # the extension's default
    result = split_regions("castle BREAK a BREAK b", use_base=True, base_ratios="0.1,0.5")
    assert result.base == "castle" and result.base_weights == (0.1, 0.5)
    result = split_regions("stars ADDCOMM castle ADDBASE a BREAK b", "columns", "1,1")
    assert (result.common, result.base) == ("stars", "stars, castle")
    assert [reg.prompt for reg in result.regions] == ["stars, a", "stars, b"]
    assert split_regions("a BREAK b").base_weights == (0.0, 0.0)


def test_prompt_without_keywords_is_one_region():
    result = split_regions("a cat on a mat ")
    assert result.regions == [Region("a cat on a mat", (0.0, 0.0, 1.0, 1.0))]


@pytest.mark.parametrize("prompt, mode, ratios, message", [
    ("a BREAK b BREAK c", "columns", "1,1", "3 region prompts but the divide ratio '1,1' describes 2"),
    ("a ADDCOL b", "columns", "1;1", None),
    ("a ADDP b", "columns", None, "ADDP"),
    ("a BREAK b", "columns", "1,-1", "non-negative"),
    ("a BREAK b", "columns", "0,0", "positive sum"),
    ("a BREAK b", "diagonal", None, "not one of columns and rows"),
    ("b ADDBASE c ADDCOMM d", "columns", None, "ADDBASE before ADDCOMM"),
    ("a ADDCOMM b ADDCOMM c", "columns", None, "once"),
])
def test_region_errors(prompt, mode, ratios, message):
    if message is None:  # a grid from the prompt with a ratio for rows: broadcast, not an error
        assert len(split_regions(prompt, mode, ratios).regions) == 2
        return
    with pytest.raises(PresetError, match=message):
        split_regions(prompt, mode, ratios)


# ------------------------------------------------------------------ no torch


def test_module_imports_without_torch():
    code = "import sys, studio.a1111; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent).returncode == 0
