"""The Python API: Studio.load / generate / save, the LoRA cache, compositions from dicts, presets and A1111
prompts, and a PNG that reopens on another machine's library layout."""
import shutil

import pytest
from PIL import Image
from pydantic import ValidationError

from studio import Composition, Lora, Region, Studio
from studio.errors import LoraError, PresetError


@pytest.fixture()
def library(tiny_loras, tmp_path):
    folder = tmp_path / "library"
    folder.mkdir()
    for path in tiny_loras.values():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture()
def studio(tiny_pipe, library):
    return Studio(tiny_pipe, library=library)


def test_generate_from_an_a1111_prompt_returns_one_result_per_seed_and_saves_them(studio, tmp_path):
    results = studio.generate("a large solid red sks <lora:alpha:0.8>, white background", seeds=[1, 2], steps=2)
    assert [r.seed for r in results] == [1, 2]
    first = results[0]
    assert first.composition.method == "merge" and first.composition.prompt == "a large solid red sks , white background"  # A1111 removes only the tag
    [entry] = first.composition.loras
    assert entry.weight == 0.8 and entry.file.endswith("alpha.safetensors") and entry.trigger_words == ["sks"]
    assert first.image.size == (64, 64)
    assert set(first.timings) == {"loras", "sampling", "total"} and first.timings["total"] > 0
    written = results.save(tmp_path / "out")
    assert [p.name for p in written] == ["image-merge-1.png", "image-merge-2.png"]
    assert "<lora:alpha:0.8>" in Image.open(written[0]).text["parameters"]


def test_loras_stay_in_memory_across_calls_and_the_least_recently_used_leave_first(studio, library):
    studio.generate("a sks <lora:alpha>", steps=1)
    studio.generate("a sks <lora:alpha:0.5>", steps=1)
    assert studio.library.cache.reads == 1
    first = studio.lora("alpha")
    assert studio.lora(library / "alpha.safetensors") is first
    one_size = studio.library.cache.total_bytes
    studio.library.cache.max_bytes = one_size + 1  # room for one LoRA
    studio.lora("beta")
    assert len(studio.library.cache) == 1 and studio.lora("beta") is not first
    studio.lora("alpha")
    assert studio.library.cache.reads == 3  # alpha was dropped for beta, then read again


def test_add_lora_names_a_file_outside_the_library(studio, tiny_loras, tmp_path):
    outside = tmp_path / "elsewhere" / "hero-v3.safetensors"
    outside.parent.mkdir()
    shutil.copy(tiny_loras["beta"], outside)
    studio.add_lora(outside, name="hero")
    composition = studio.composition("a ohwx <lora:hero:0.6:0.9>")
    [entry] = composition.loras
    assert entry.file == str(outside.resolve()) and entry.weight == 0.9 and entry.text_encoder_weight == 0.6


def test_a_composition_built_in_code_is_validated_like_a_preset(studio, tiny_loras):
    with pytest.raises(ValidationError):
        Composition(prompt="x", steps=0)
    with pytest.raises(PresetError, match="field `steps`"):
        studio.composition({"prompt": "x", "steps": 0})
    with pytest.raises(PresetError, match="field `width`"):
        studio.composition("a sks", width=100)
    composition = Composition(prompt="a sks on the left", steps=1, method="regional",
                              loras=[Lora(file=str(tiny_loras["alpha"]), region=Region(box=(0, 0, 0.5, 1)))])
    [result] = studio.generate(composition, sampler="Euler a")
    assert result.composition.scheduler == "Euler a" and result.info["sampler"] == "Euler a"
    assert "Sampler: Euler a" in result.parameters()


def test_break_places_each_region_prompts_loras_as_regional_prompter_divides_the_image(studio):
    composition = studio.composition("two shapes ADDCOMM a red sks <lora:alpha> BREAK a blue ohwx <lora:beta:0.7>")
    assert composition.method == "regional"
    left, right = composition.loras
    assert left.region.box == (0.0, 0.0, 0.5, 1.0) and right.region.box == (0.5, 0.0, 1.0, 1.0)
    assert left.role == right.role == "concept" and right.weight == 0.7
    assert "sks" in left.prompt and "ohwx" in right.prompt and "<lora" not in left.prompt


def test_a_lora_is_found_by_its_ss_output_name_as_a1111_finds_it(studio, library):
    from safetensors.torch import load_file, save_file

    save_file(load_file(library / "beta.safetensors"), library / "beta_v3_final.safetensors",
              metadata={"ss_output_name": "hero"})
    [entry] = studio.composition("a ohwx <lora:hero:0.6>").loras
    assert entry.file == str(library / "beta_v3_final.safetensors") and entry.weight == 0.6


def test_a_missing_lora_name_is_one_sentence(studio):
    with pytest.raises(LoraError, match=r"No LoRA named nothere"):
        studio.composition("a <lora:nothere:1>")


def test_a_png_reopens_on_another_machine_with_the_library_elsewhere(tiny_pipe, library, tmp_path):
    [result] = Studio(tiny_pipe, library=library).generate("a red sks <lora:alpha:0.9> and a ohwx <lora:beta>",
                                                           steps=2, seed=4)
    [png, *_] = result.save(tmp_path / "out")
    other = tmp_path / "machine-b" / "models" / "Lora"
    shutil.copytree(library, other)
    shutil.rmtree(library)
    [again] = Studio(tiny_pipe, library=other).generate(png)
    assert [e.file for e in again.composition.loras] == [str(other / "alpha.safetensors"),
                                                         str(other / "beta.safetensors")]
    assert again.png_bytes() == png.read_bytes()
    (other / "beta.safetensors").unlink()
    with pytest.raises(LoraError, match=r"The LoRA beta.safetensors \(sha256 [0-9a-f]{12}…\) named in the composition"):
        Studio(tiny_pipe, library=other).generate(png)


METHOD_LORAS = {  # (library file, role, box) per method; b4m runs the bundled B4M pair
    "b4m": [("cross-content", "concept", None), ("sepia-style", "style", None)],
    "k_lora": [("alpha", "concept", None), ("gamma", "style", None)],
}


@pytest.mark.parametrize("method", ["regional", "lora_composer", "clora", "merge", "switch", "composite", "b4m",
                                    "k_lora"])
def test_every_methods_png_parses_back_field_by_field_with_a1111s_parser(tiny_pipe, library, method, tmp_path):
    from studio import paths
    from studio.a1111 import parse_lora_tags
    from tests.test_a1111 import parse_generation_parameters

    for name in ("cross-content", "sepia-style"):
        shutil.copy(paths.EXAMPLE_B4M / f"{name}.safetensors", library / f"{name}.safetensors")
    studio = Studio(tiny_pipe, library=library)
    loras = METHOD_LORAS.get(method, [("alpha", "concept", (0, 0, 0.5, 1)), ("beta", "concept", (0.5, 0, 1, 1))])
    composition = Composition(
        prompt="a red sks, on the left: and a blue ohwx", negative_prompt="blurry, text: none\nsecond line",
        steps=2, guidance=7.5, seed=11, method=method, scheduler="DPM++ 2M Karras", width=64, height=48,
        loras=[Lora(file=str(library / f"{name}.safetensors"), weight=0.75, role=role, trigger_words=[word],
                    region=Region(box=box) if box else None) for (name, role, box), word in zip(loras, ["sks", "ohwx"])])
    [result] = studio.generate(composition)
    [png, *_] = result.save(tmp_path)
    fields = parse_generation_parameters(Image.open(png).text["parameters"])
    text, tags = parse_lora_tags(fields["Prompt"])
    assert text.strip() == composition.prompt
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [(name, 0.75, 0.75) for name, _, _ in loras]
    assert fields["Negative prompt"] == composition.negative_prompt
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"], fields["Seed"]) == \
        ("2", "DPM++ 2M", "Karras", "7.5", "11")
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "48")
    assert fields["Model"] == "shapes-world" and fields["Model hash"] == studio.model_hash and len(studio.model_hash) == 10
    hashes = dict(pair.split(": ") for pair in fields["Lora hashes"].split(", "))
    assert hashes == {name: studio.lora(name).info.short_hash for name, _, _ in loras}


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC",
                                     "DDIM", "LCM"])
def test_every_a1111_sampler_runs_and_is_named_in_the_png(studio, sampler):
    from studio.a1111 import A1111_SAMPLERS, infotext_sampler

    [result] = studio.generate("a red sks <lora:alpha>", steps=3, sampler=sampler)
    assert type(studio.pipe.scheduler).__name__ != A1111_SAMPLERS[sampler][0] or sampler == "DDIM"  # restored after
    assert result.composition.scheduler == sampler and result.info["sampler"] == sampler
    written, schedule = infotext_sampler(sampler)
    assert f"Sampler: {written}, Schedule type: {schedule}," in result.parameters()
    assert result.image.getextrema() != ((0, 0), (0, 0), (0, 0))
