"""The enrollment page of ``fewshot-edge serve`` in a real headless Chromium (the system's, driven by
Playwright): it loads, enrolls classes from uploaded images, shows them with thumbnails, predicts an
uploaded query, takes camera shots and live predictions (Chromium's fake camera), renames and removes.

Skips when Playwright or Chromium is missing, and fails instead when FEWSHOT_EDGE_REQUIRE_BROWSER=1
(set by .ci/run, which installs both). FEWSHOT_EDGE_SCREENSHOT=FILE keeps the page's screenshot there
(docs/serve.png was taken this way)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fewshot_edge import glyphs
from fewshot_edge.serve.process import serving

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",  # grant the camera without asking
    "--use-fake-device-for-media-stream",  # a synthetic camera
]
TIMEOUT_MS = 30_000


def chromium() -> str:
    """The Chromium to drive (FEWSHOT_EDGE_CHROMIUM, else one on the PATH); skip, or fail in CI, without it
    or without Playwright."""
    found = os.environ.get("FEWSHOT_EDGE_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install playwright; the browser is the system's Chromium)"
    if reason is None and not (found and Path(found).is_file()):
        reason = f"no Chromium {'at ' + found if found else 'found'} (apt-get install chromium, or set FEWSHOT_EDGE_CHROMIUM)"
    if reason:
        if os.environ.get("FEWSHOT_EDGE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert found is not None
    return found


def glyph_files(folder: Path, name: str, seed: int, hands: range) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    symbol = glyphs.draw(seed)
    paths = []
    for hand in hands:
        path = folder / f"{name}-{hand}.png"
        Image.fromarray(glyphs.perturb(symbol, hand)).save(path)
        paths.append(str(path))
    return paths


def test_the_page_enrolls_shows_predicts_and_edits(tmp_path):
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    shots = {name: glyph_files(tmp_path / "shots", name, seed, range(3)) for seed, name in enumerate(["alpha", "beta"])}
    query = glyph_files(tmp_path / "query", "query", 1, range(7, 8))  # another hand's beta
    with (
        serving(tmp_path / "device.db", log=tmp_path / "server.log") as url,
        sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 540})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            expect(page.locator("#status")).to_have_text("ready")
            expect(page.locator("#info")).to_contain_text("omniglot-conv4 · mode prototype · fp32 · cpu")
            expect(page.locator("#key-form")).to_be_hidden()
            expect(page.locator("#no-classes")).to_be_visible()

            for name, files in shots.items():
                page.fill("#enroll-label", name)
                page.set_input_files("#enroll-files", files)
                page.click("#enroll-submit")
                expect(page.locator("#status")).to_have_text(f"enrolled '{name}': 3 shots")
            cards = page.locator("#classes .class")
            expect(cards).to_have_count(2)
            expect(page.locator('.class[data-label="beta"] .shots')).to_have_text("3 shots")
            for name in shots:  # each thumbnail is the first shot at the model's 28x28
                thumb = page.locator(f'.class[data-label="{name}"] .thumb')
                expect(thumb).to_have_attribute("alt", f"first shot of {name}")
                page.wait_for_function("img => img.complete && img.naturalWidth === 28", arg=thumb.element_handle())

            page.set_input_files("#predict-files", query)
            page.click("#predict-submit")
            answer = page.locator("#predictions .prediction")
            expect(answer).to_have_count(1)
            expect(answer).to_have_attribute("data-label", "beta")
            expect(answer).to_contain_text("query-7.png: beta")
            screenshot = page.screenshot(full_page=True)
            Image.open(io.BytesIO(screenshot)).verify()
            if os.environ.get("FEWSHOT_EDGE_SCREENSHOT"):
                Path(os.environ["FEWSHOT_EDGE_SCREENSHOT"]).write_bytes(screenshot)

            # the camera (Chromium's synthetic one): a shot is enrolled, live predictions arrive
            page.click("#camera-start")
            expect(page.locator("#status")).to_have_text("camera on")
            page.click("#camera-shot")
            expect(page.locator("#shots li")).to_have_count(1)
            page.fill("#enroll-label", "camera")
            page.click("#camera-enroll")
            expect(page.locator("#status")).to_have_text("enrolled 'camera': 1 shot")
            page.click("#camera-live")
            expect(page.locator("#live")).to_contain_text("distance")
            page.click("#camera-live")

            # rename and remove (accepting the confirmation)
            page.fill('.class[data-label="alpha"] .rename-input', "first")
            page.click('.class[data-label="alpha"] .rename button')
            expect(page.locator('.class[data-label="first"]')).to_have_count(1)
            page.on("dialog", lambda dialog: dialog.accept())
            page.click('.class[data-label="first"] .remove')
            expect(cards).to_have_count(2)
            assert errors == []
        finally:
            browser.close()
        listed = httpx.get(f"{url}/classes").json()["classes"]
    assert listed == [{"label": "beta", "shots": 3}, {"label": "camera", "shots": 1}]


def test_the_page_asks_for_the_api_key(tmp_path):
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    shot = glyph_files(tmp_path, "alpha", 0, range(1))
    with (
        serving(tmp_path / "device.db", env={"FEWSHOT_EDGE_API_KEY": "s3cret"}) as url,
        sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.locator("#key-form")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("missing or wrong API key")
            page.fill("#key-input", "s3cret")
            page.click("#key-form button")
            expect(page.locator("#status")).to_have_text("ready")
            expect(page.locator("#key-form")).to_be_hidden()
            page.fill("#enroll-label", "alpha")
            page.set_input_files("#enroll-files", shot)
            page.click("#enroll-submit")
            thumb = page.locator('.class[data-label="alpha"] .thumb')
            page.wait_for_function("img => img.complete && img.naturalWidth === 28", arg=thumb.element_handle())
        finally:
            browser.close()
