"""The web studio under load, through gradio_client as other programs use it: 20 users at once, each their own
image; Stop ends only its own user's run, within one step; a run that runs out of memory is one sentence and the
next run is normal; listening beyond localhost without a password warns how to share safely."""
import io
import json
import re
import shutil
import threading
import time

import pytest
import torch
from PIL import Image

PORT = 7879
USERS = 20


@pytest.fixture(scope="module")
def server(tiny_folder, tiny_loras, tmp_path_factory):
    from studio import webapp

    library = tmp_path_factory.mktemp("loadlibrary")
    for name in ("alpha", "beta"):
        shutil.copy(tiny_loras[name], library / f"{name}.safetensors")
    demo = webapp.main(host="127.0.0.1", port=PORT, model=str(tiny_folder), library=str(library),
                       prevent_thread_lock=True)
    yield demo
    demo.close()


def client():
    from gradio_client import Client

    return Client(f"http://127.0.0.1:{PORT}/", verbose=False)


def preset(steps: int = 3) -> str:
    return json.dumps({"prompt": "a large solid red sks on the left and a blue ohwx on the right", "steps": steps,
                       "method": "regional",
                       "loras": [{"file": "alpha.safetensors", "trigger_words": ["sks"],
                                  "region": {"box": [0, 0, 0.5, 1]}},
                                 {"file": "beta.safetensors", "trigger_words": ["ohwx"],
                                  "region": {"box": [0.5, 0, 1, 1]}}]})


def test_twenty_users_at_once_each_get_their_own_image(server):
    outcomes, errors = {}, []

    def user(seed: int):
        try:
            image, preset_file, note = client().predict(preset(), seed, [], api_name="/generate")
            outcomes[seed] = (Image.open(image), json.loads(open(preset_file).read()), note)
        except Exception as exc:  # noqa: BLE001 — collected and reported below
            errors.append(f"user {seed}: {exc!r}")

    threads = [threading.Thread(target=user, args=(seed,)) for seed in range(USERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert sorted(outcomes) == list(range(USERS))
    for seed, (image, composition, note) in outcomes.items():
        assert composition["seed"] == seed and f"seed {seed}" in note
        assert json.loads(image.text["lora-studio"])["seed"] == seed
    pixels = {seed: image.convert("RGB").tobytes() for seed, (image, _, _) in outcomes.items()}
    assert len(set(pixels.values())) == USERS  # every user got a different image: their own
    state = server.studio_state
    [again] = state.studio.generate(state.admit(state.studio.composition(json.loads(preset()))), seeds=[7])
    assert again.image.convert("RGB").tobytes() == pixels[7]  # and it is the image of their seed


def test_stop_ends_only_its_own_users_run_within_one_step(server):
    stopper, other = client(), client()
    long_run = stopper.submit(preset(steps=150), 1, [], api_name="/generate")
    other_run = other.submit(preset(steps=3), 2, [], api_name="/generate")
    deadline, answer = time.time() + 120, ""
    while time.time() < deadline and not long_run.done():
        answer = stopper.predict(api_name="/stop")
        if answer.startswith("Stopped your run"):
            break
        time.sleep(0.2)
    reached = int(re.search(r"step (\d+) of 150", answer).group(1))
    image, _, note = long_run.result(timeout=300)
    cancelled_at = int(re.search(r"cancelled at step (\d+) of 150", note).group(1))
    assert image is None and reached <= cancelled_at <= reached + 1, (answer, note)
    other_image, _, other_note = other_run.result(timeout=300)
    assert other_image and "cancelled" not in other_note and "seed 2" in other_note
    assert other.predict(api_name="/stop") == "Nothing of yours is running."


def test_a_run_out_of_memory_is_one_sentence_and_the_next_run_is_normal(server, monkeypatch):
    from gradio_client.exceptions import AppError

    from composers.regional import RegionalComposer
    from studio.models import pipeline_fingerprint

    state = server.studio_state
    before = pipeline_fingerprint(state.pipe)
    real_predict = RegionalComposer.predict
    calls = []

    def predict_out_of_memory(self, session, latents, step, t):
        calls.append(step)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_predict(self, session, latents, step, t)

    monkeypatch.setattr(RegionalComposer, "predict", predict_out_of_memory)
    with pytest.raises(AppError) as error:
        client().predict(preset(), 5, [], api_name="/generate")
    message = str(error.value)
    assert "ran out of memory" in message and "\n" not in message.strip()
    assert pipeline_fingerprint(state.pipe) == before and not state.lock.locked()
    image, _, note = client().predict(preset(), 5, [], api_name="/generate")
    assert Image.open(image).size == (64, 64) and "seed 5" in note


def test_listening_beyond_localhost_without_a_password_warns_how_to_share_safely(tiny_folder, capsys):
    from gradio_client import Client

    from studio import webapp

    demo = webapp.main(host="0.0.0.0", port=PORT + 1, model=str(tiny_folder), prevent_thread_lock=True)
    demo.close()
    warning = capsys.readouterr().err
    assert "without a password" in warning and "--auth USER:PASSWORD" in warning and "SSH tunnel" in warning

    demo = webapp.main(host="0.0.0.0", port=PORT + 2, model=str(tiny_folder), prevent_thread_lock=True,
                       auth="designer:s3cret")
    try:
        assert "without a password" not in capsys.readouterr().err
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{PORT + 2}/", verbose=False)
        assert Client(f"http://127.0.0.1:{PORT + 2}/", auth=("designer", "s3cret"), verbose=False)
    finally:
        demo.close()


def test_the_default_is_localhost():
    import inspect

    from studio import cli, webapp

    assert inspect.signature(webapp.main).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.serve).parameters["host"].default.default == "127.0.0.1"


def test_an_image_file_comes_back_as_png_with_its_metadata(server):
    image, _, _ = client().predict(preset(), 11, [], api_name="/generate")
    data = open(image, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora-studio" in Image.open(io.BytesIO(data)).text


def test_the_named_endpoints_describe_methods_inspect_a_lora_and_open_a_preset(server, tiny_loras, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    api = client()
    names = {endpoint.lstrip("/") for endpoint in api.view_api(print_info=False, return_format="dict")
             ["named_endpoints"]}
    assert {"generate", "inspect_lora", "methods", "open_preset", "stop", "upload_loras"} <= names
    assert len(names) <= 8  # the page's own events are private: programs see a small, typed API
    methods = api.predict(api_name="/methods")
    assert methods["regional"]["schema"]["properties"]["auto_steps"]["minimum"] == 1
    info = api.predict(handle_file(str(tiny_loras["alpha"])), api_name="/inspect_lora")
    assert info["trigger_words"] == ["sks"] and info["base_model"] == "shapes-world" and len(info["sha256"]) == 64
    opened = api.predict(None, "two-concepts", api_name="/open_preset")
    assert opened["method"] and len(opened["loras"]) == 2
    image, _, _ = api.predict(preset(), 3, [], api_name="/generate")
    from_png = api.predict(handle_file(image), "", api_name="/open_preset")
    assert from_png["seed"] == 3 and [lora["region"]["box"] for lora in from_png["loras"]] == [[0, 0, 0.5, 1],
                                                                                             [0.5, 0, 1, 1]]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AppError, match="broken.json is not valid JSON"):
        api.predict(handle_file(str(broken)), "", api_name="/open_preset")


def test_generate_takes_the_lora_files_a_composition_names_along_with_it(server, tiny_loras):
    from gradio_client import handle_file

    composition = json.dumps({"prompt": "a gamma thing", "steps": 2,
                              "loras": [{"file": "gamma.safetensors", "region": {"box": [0, 0, 0.5, 1]}}]})
    image, _, note = client().predict(composition, 4, [handle_file(str(tiny_loras["gamma"]))],
                                      api_name="/generate")
    assert "seed 4" in note
    assert json.loads(Image.open(image).text["lora-studio"])["loras"][0]["file"] == "gamma.safetensors"
