"""The web studio starts on 127.0.0.1 and composes through its own handlers."""
import urllib.request

import pytest


@pytest.fixture(scope="module")
def running_app(tiny_pipe, tmp_path_factory):
    import app

    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    demo = app.main(host="127.0.0.1", port=7871, model=str(folder), prevent_thread_lock=True)
    yield demo
    demo.close()


def test_studio_serves_its_page_on_localhost(running_app):
    with urllib.request.urlopen("http://127.0.0.1:7871/", timeout=30) as response:
        assert response.status == 200
        assert "LoRA Studio" in response.read().decode()


def test_layout_preview_draws_each_placed_box():
    import app

    slots = [{"file": "a", "use_box": True, "box": (0.0, 0.0, 0.5, 1.0)},
             {"file": "b", "use_box": True, "box": (0.5, 0.0, 1.0, 1.0)}]
    image = app.layout_preview(64, slots)
    assert image.size == (256, 256)
    assert image.getpixel((0, 128)) != image.getpixel((128, 40))  # the first box's edge is drawn
