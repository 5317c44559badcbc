"""The studio in a real browser (Playwright driving Debian's Chromium): a designer's first generation.
Skipped where /usr/bin/chromium is not installed."""
import shutil
from contextlib import contextmanager

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def studio_url(tiny_pipe, tiny_loras, tmp_path_factory):
    import shutil as sh

    from studio import webapp

    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    library = tmp_path_factory.mktemp("library")
    for name in ("alpha", "beta"):
        sh.copy(tiny_loras[name], library / f"{name}.safetensors")
    demo = webapp.main(host="127.0.0.1", port=7875, model=str(folder), library=str(library), prevent_thread_lock=True)
    yield "http://127.0.0.1:7875/"
    demo.close()


@contextmanager
def studio_page(url, *launch_args):
    """A page of the studio, once it has loaded, in Debian's Chromium."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", *launch_args])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        expect(page.get_by_text("LoRA Studio").first).to_be_visible(timeout=60_000)
        yield page
        browser.close()


def pick(page, dropdown, option):
    """Choose `option` in `dropdown` and wait for its list to close (the next one must not open over it)."""
    from playwright.sync_api import expect

    dropdown.click()
    page.locator(f"li[role=option][aria-label='{option}']:visible").click()
    page.keyboard.press("Escape")
    expect(page.locator("li[role=option]:visible")).to_have_count(0, timeout=10_000)


def test_a_designer_places_two_loras_and_generates(studio_url, tmp_path):
    from playwright.sync_api import expect

    with studio_page(studio_url, "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync") as page:
        page.get_by_label("Steps").first.fill("2")
        for index, name in enumerate(("alpha", "beta")):
            pick(page, page.get_by_label("File").nth(index), f"{name} (shapes-world)")
        expect(page.get_by_label("Trigger words (comma separated)").first).to_have_value("sks", timeout=30_000)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text("UNet passes per step")).to_be_visible(timeout=120_000)
        page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
        result = page.locator("#result img")
        expect(result).to_be_visible(timeout=30_000)
        assert result.get_attribute("src").split("?")[0].endswith(".png")
        # each concept's map (last step) and mask
        expect(page.locator("#maps img")).to_have_count(4, timeout=30_000)


def test_a_designer_opens_a_bundled_example_preset(studio_url):
    from playwright.sync_api import expect

    with studio_page(studio_url) as page:
        page.get_by_label("Example presets").click()
        page.locator("li[role=option][aria-label='two-concepts']:visible").click()
        prompt = "a large solid red sks on the left and a large solid blue ohwx on the right, white background"
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt, timeout=30_000)
        expect(page.get_by_label("Region prompt (default: the prompt)").nth(1)).to_have_value(
            "a large solid blue ohwx on the right, white background")


def test_the_break_for_make_tab_explains_why_two_ordinary_loras_cannot_be_assembled(studio_url):
    from playwright.sync_api import expect

    with studio_page(studio_url) as page:
        page.get_by_role("tab", name="Break-for-Make").click()
        expect(page.get_by_label("Joint fine-tune steps (0: assembly alone; official: 1000)")).to_have_value("0")
        for label, name in (("Content adapter", "alpha"), ("Style adapter", "beta")):
            pick(page, page.get_by_label(label), f"{name} (shapes-world)")
        page.get_by_role("button", name="Assemble").click()
        expect(page.get_by_text("Cannot assemble: B4M assembly combines a content and a style adapter")).to_be_visible(
            timeout=60_000)
        expect(page.get_by_text("alpha.safetensors is an ordinary LoRA")).to_be_visible()
