"""Makes docs/images/web-studio.png: the web studio on the bundled model, the two-concepts example opened, the second
concept's box replaced by a painted mask, generated with LoRA-Composer; the picture is the page's design column (the
canvas, then the result with each concept's attention map and mask over it). Needs Playwright and Debian's Chromium:
    .venv/bin/python docs/images/make_web_studio_png.py
"""
import shutil
import sys
import tempfile
from pathlib import Path

PORT = 7893


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    from studio import webapp

    outputs = tempfile.mkdtemp(prefix="web-studio-png-")
    demo = webapp.main(port=PORT, outputs=outputs, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(f"http://127.0.0.1:{PORT}/")
            expect(page.locator("#canvas canvas.board")).to_be_visible(timeout=60_000)
            page.get_by_label("Example presets").click()
            page.locator("li[role=option][aria-label='two-concepts']:visible").click()
            expect(page.locator("#canvas .chips button")).to_have_count(2, timeout=30_000)
            page.get_by_label("Method").click()
            page.locator("li[role=option][aria-label='lora_composer']:visible").click()
            page.keyboard.press("Escape")
            page.locator("#canvas .chips button").nth(1).click()
            page.locator("#canvas [data-tool=paint]").click()
            page.locator("#canvas .brush input").fill("14")
            board = page.locator("#canvas canvas.board").bounding_box()
            page.mouse.move(board["x"] + 0.62 * board["width"], board["y"] + 0.3 * board["height"])
            page.mouse.down()
            for x, y in ((0.92, 0.3), (0.92, 0.45), (0.62, 0.45), (0.62, 0.62), (0.92, 0.62), (0.92, 0.75),
                         (0.62, 0.75)):
                page.mouse.move(board["x"] + x * board["width"], board["y"] + y * board["height"], steps=6)
            page.mouse.up()
            expect(page.get_by_label("painted mask")).to_be_checked(timeout=10_000)
            page.locator("#generate").click()
            expect(page.locator("#run-note")).to_contain_text("UNet passes per step", timeout=300_000)
            page.wait_for_timeout(1500)
            out = Path(__file__).with_name("web-studio.png")
            # the design column: the canvas above, the result with its overlays below
            top = page.locator("#canvas").bounding_box()
            bottom = page.locator("#overlays").bounding_box()
            page.screenshot(path=str(out), full_page=True,
                            clip={"x": top["x"] - 8, "y": top["y"] - 8, "width": top["width"] + 16,
                                  "height": bottom["y"] + bottom["height"] - top["y"] + 16})
            print(f"wrote {out}")
            browser.close()
    finally:
        demo.close()
        shutil.rmtree(outputs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
