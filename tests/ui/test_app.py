"""The web studio starts on 127.0.0.1 and composes through its own handlers."""
import urllib.request

import pytest


@pytest.fixture(scope="module")
def running_app(tiny_pipe, tmp_path_factory):
    from studio import webapp

    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    demo = webapp.main(host="127.0.0.1", port=7871, model=str(folder), prevent_thread_lock=True)
    yield demo
    demo.close()


def test_studio_serves_its_page_on_localhost(running_app):
    with urllib.request.urlopen("http://127.0.0.1:7871/", timeout=30) as response:
        assert response.status == 200
        assert "LoRA Studio" in response.read().decode()


def test_layout_preview_draws_each_placed_box():
    from studio import webapp

    slots = [{"file": "a", "use_box": True, "box": (0.0, 0.0, 0.5, 1.0)},
             {"file": "b", "use_box": True, "box": (0.5, 0.0, 1.0, 1.0)}]
    image = webapp.layout_preview(64, slots)
    assert image.size == (256, 256)
    assert image.getpixel((0, 128)) != image.getpixel((128, 40))  # the first box's edge is drawn


def test_studio_serve_starts_the_server_outside_the_checkout(tiny_pipe, tmp_path):
    """`make studio` runs the console script, whose import path is not the checkout's."""
    import subprocess
    import sys
    import time

    tiny_pipe.save_pretrained(tmp_path / "model")
    server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", "7873", "--model",
                               str(tmp_path / "model")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:7873/", timeout=5) as response:
                    assert "LoRA Studio" in response.read().decode()
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"the studio did not start: {server.stdout.read() if server.poll() is not None else ''}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_python_app_py_is_the_same_entry_point(tmp_path):
    import subprocess
    import sys

    from studio import paths

    result = subprocess.run([sys.executable, str(paths.PROJECT_ROOT / "app.py"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--port" in result.stdout, result.stderr
