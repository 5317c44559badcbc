"""The studio in a real browser (Playwright driving Debian's Chromium): a designer drags boxes and paints a mask on
the canvas, generates, reads the overlays and restores the composition by dropping the PNG; Stop ends one page's run
and leaves another page's alone. Screenshots go to each test's output folder. Skipped where /usr/bin/chromium is not
installed."""
import json
import re
import shutil
from contextlib import contextmanager

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
PORT = 7875
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def studio(tiny_folder, tiny_loras, tmp_path_factory):
    from studio import webapp

    library = tmp_path_factory.mktemp("library")
    for name in ("alpha", "beta", "gamma"):
        shutil.copy(tiny_loras[name], library / f"{name}.safetensors")
    outputs = tmp_path_factory.mktemp("outputs")
    demo = webapp.main(host="127.0.0.1", port=PORT, model=str(tiny_folder), library=str(library),
                       outputs=str(outputs), prevent_thread_lock=True)
    yield {"url": f"http://127.0.0.1:{PORT}/", "outputs": outputs}
    demo.close()


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


def open_page(chromium, url):
    """A page of the studio in its own browser context (its own Gradio session), once it has loaded."""
    from playwright.sync_api import expect

    page = chromium.new_context(viewport={"width": 1500, "height": 1700}).new_page()
    page.goto(url)
    expect(page.get_by_text("LoRA Studio").first).to_be_visible(timeout=60_000)
    expect(page.locator("#canvas canvas.board")).to_be_visible(timeout=30_000)
    return page


def pick(page, dropdown, option):
    """Choose `option` in `dropdown` and wait for its list to close (the next one must not open over it)."""
    from playwright.sync_api import expect

    dropdown.click()
    page.locator(f"li[role=option][aria-label='{option}']:visible").click()
    page.keyboard.press("Escape")
    expect(page.locator("li[role=option]:visible")).to_have_count(0, timeout=10_000)


def add_lora(page, name, count):
    from playwright.sync_api import expect

    pick(page, page.get_by_label("From the library"), f"{name} (shapes-world)")
    page.get_by_role("button", name="Add LoRA").click()
    expect(page.locator("#canvas .chips button")).to_have_count(count, timeout=30_000)


def gesture(page, points):
    """Press at the first point, move through the others, release: relative coordinates on the canvas."""
    box = page.locator("#canvas canvas.board").bounding_box()
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point, steps=4)
    page.mouse.up()


def set_steps(page, steps):
    field = page.get_by_label("Steps").first
    field.fill(str(steps))
    field.press("Enter")


def latest(folder, suffix):
    return max(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)


def test_a_designer_draws_two_boxes_paints_a_mask_generates_and_restores_it_from_the_png(studio, tmp_path):
    from playwright.sync_api import expect

    with browser() as chromium:
        page = open_page(chromium, studio["url"])
        prompt = "a red sks on the left, a blue ohwx on the right, a gamma below"
        page.get_by_label("Prompt", exact=True).fill(prompt)
        for count, name in enumerate(("alpha", "beta", "gamma"), start=1):
            add_lora(page, name, count)
        expect(page.get_by_label("Trigger words (comma separated)").first).to_have_value("sks")
        chips = page.locator("#canvas .chips button")
        chips.nth(0).click()
        gesture(page, [(0.05, 0.1), (0.40, 0.5)])
        expect(page.get_by_label("x1")).to_have_value("0.4", timeout=10_000)
        gesture(page, [(0.40, 0.5), (0.45, 0.6)])  # its corner: resized
        expect(page.get_by_label("y1")).to_have_value("0.6", timeout=10_000)
        gesture(page, [(0.2, 0.3), (0.25, 0.3)])  # inside it: moved
        expect(page.get_by_label("x0")).to_have_value("0.1", timeout=10_000)
        gesture(page, [(0.25, 0.3), (0.2, 0.3)])
        expect(page.get_by_label("x0")).to_have_value("0.05", timeout=10_000)
        chips.nth(1).click()
        gesture(page, [(0.55, 0.1), (0.95, 0.6)])
        expect(page.get_by_label("x0")).to_have_value("0.55", timeout=10_000)
        chips.nth(2).click()
        page.locator("#canvas [data-tool=paint]").click()
        gesture(page, [(0.2, 0.8), (0.5, 0.82), (0.8, 0.8)])
        expect(page.get_by_label("painted mask")).to_be_checked(timeout=10_000)
        set_steps(page, 3)
        page.screenshot(path=str(tmp_path / "1-placed.png"), full_page=True)

        page.locator("#generate").click()
        expect(page.locator("#run-note")).to_contain_text("UNet passes per step", timeout=120_000)
        saved = json.loads(latest(studio["outputs"], ".json").read_text())
        kinds = [next(iter(lora["region"])) for lora in saved["loras"]]
        assert kinds == ["box", "box", "mask"], saved
        assert saved["loras"][0]["region"]["box"] == pytest.approx([0.05, 0.1, 0.45, 0.6], abs=0.02)
        assert saved["loras"][2]["region"]["mask"].startswith("data:image/png;base64,")

        result = page.locator("#result img")
        expect(result).to_be_visible(timeout=30_000)
        assert result.evaluate("img => img.naturalWidth") >= 512  # 64 px shown enlarged
        overlays = page.locator("#overlays input[type=checkbox]")
        expect(overlays).to_have_count(3)
        assert all(overlays.nth(i).is_checked() for i in range(3))
        before = result.get_attribute("src")
        page.screenshot(path=str(tmp_path / "2-generated.png"), full_page=True)
        overlays.nth(0).uncheck()
        expect(result).not_to_have_attribute("src", before, timeout=30_000)
        page.screenshot(path=str(tmp_path / "3-overlay-toggled.png"), full_page=True)

        png = latest(studio["outputs"], ".png")
        fresh = open_page(chromium, studio["url"])
        fresh.locator("#drop input[type=file]").set_input_files(str(png))
        expect(fresh.get_by_label("Prompt", exact=True)).to_have_value(prompt, timeout=30_000)
        expect(fresh.locator("#canvas .chips button")).to_have_count(3, timeout=30_000)
        expect(fresh.get_by_label("Trigger words (comma separated)")).to_have_count(3)
        expect(fresh.get_by_label("x0")).to_have_value("0.05")
        fresh.locator("#canvas .chips button").nth(2).click()
        expect(fresh.get_by_label("painted mask")).to_be_checked(timeout=10_000)
        fresh.screenshot(path=str(tmp_path / "4-restored-from-png.png"), full_page=True)


def test_stop_ends_only_this_pages_run_and_the_next_run_succeeds(studio, tmp_path):
    from playwright.sync_api import expect

    with browser() as chromium:
        first, second = open_page(chromium, studio["url"]), open_page(chromium, studio["url"])
        for page, name in ((first, "alpha"), (second, "beta")):
            add_lora(page, name, 1)
        set_steps(first, 150)
        set_steps(second, 3)
        first.locator("#generate").click()
        expect(first.locator("#run-note")).to_contain_text("step", timeout=60_000)  # a live preview arrived
        second.locator("#generate").click()  # waits in the device queue behind the long run, and says so
        expect(second.get_by_text(re.compile(r"queue: 1/\d")).first).to_be_visible(timeout=30_000)
        second.screenshot(path=str(tmp_path / "other-page-queued.png"), full_page=True)
        first.locator("#stop").click()
        expect(first.locator("#stop-note")).to_contain_text("Stopped your run at step", timeout=30_000)
        expect(second.locator("#run-note")).to_contain_text("UNet passes per step", timeout=60_000)
        second.screenshot(path=str(tmp_path / "other-page-completed.png"), full_page=True)
        set_steps(first, 3)
        first.locator("#generate").click()
        expect(first.locator("#run-note")).to_contain_text("UNet passes per step", timeout=60_000)
        first.screenshot(path=str(tmp_path / "stopped-page-runs-again.png"), full_page=True)

        # the history keeps every result; any of them gives its composition back
        second.get_by_role("tab", name="History").click()
        second.get_by_role("button", name="↻ Refresh").click()  # the first page's run came after this page's
        results = [p for p in studio["outputs"].glob("*.png") if not p.stem.endswith(("-map", "-mask"))]
        expect(second.locator("#history img")).to_have_count(len(results), timeout=30_000)
        second.locator("#history img").first.click()
        second.locator("#use-history").click()
        expect(second.locator("#canvas .chips button")).to_have_count(1, timeout=30_000)
        expect(second.locator("#canvas .chips button").first).to_have_text("alpha")  # the first page's last run
        expect(second.locator("#result img")).to_be_visible()
        second.screenshot(path=str(tmp_path / "history-used.png"), full_page=True)


def test_a_bundled_example_preset_opens_with_its_loras_placed(studio):
    from playwright.sync_api import expect

    with browser() as chromium:
        page = open_page(chromium, studio["url"])
        pick(page, page.get_by_label("Example presets"), "two-concepts")
        prompt = "a large solid red sks on the left and a large solid blue ohwx on the right, white background"
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt, timeout=30_000)
        expect(page.locator("#canvas .chips button")).to_have_count(2, timeout=30_000)
        expect(page.get_by_label("Region prompt (default: the prompt)").nth(1)).to_have_value(
            "a large solid blue ohwx on the right, white background")
        expect(page.get_by_label("x1")).to_have_value("0.42")  # the first LoRA, active, as the preset places it


def test_the_break_for_make_tab_explains_why_two_ordinary_loras_cannot_be_assembled(studio):
    from playwright.sync_api import expect

    with browser() as chromium:
        page = open_page(chromium, studio["url"])
        page.get_by_role("tab", name="Break-for-Make").click()
        expect(page.get_by_label("Joint fine-tune steps (0: assembly alone; official: 1000)")).to_have_value("0")
        for label, name in (("Content adapter", "alpha"), ("Style adapter", "beta")):
            pick(page, page.get_by_label(label), f"{name} (shapes-world)")
        page.get_by_role("button", name="Assemble").click()
        expect(page.get_by_text("Cannot assemble: B4M assembly combines a content and a style adapter")).to_be_visible(
            timeout=60_000)
        expect(page.get_by_text("alpha.safetensors is an ordinary LoRA")).to_be_visible()
