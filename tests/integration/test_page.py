"""The try-it page in a real browser (headless chromium) against the real server.

Each test opens the page, uploads files through its file input (what a click or a drop leads
to), waits for the cards to settle and checks what a person would see against what the API
answers for the same bytes. Screenshots go to test-artifacts/ (gitignored): look at them.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import pytest
from PIL import Image

from app.models.grids import fit_grid
from app.models.spec import ModelSpec
from app.pipeline.preprocess import crop_plan
from app.pipeline.rollout import seen_box
from export.demo.shapes import CLASSES, generate
from tests.images import encode, smooth
from tests.integration.live import ARTIFACTS, CHROMIUM_ARGS, LiveServer, chromium_path, run_server
from tests.support import DEMO_MODEL, PHOTOS, TinyRepo, need_folder

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        ElementHandle,
        FilePayload,
        Locator,
        Page,
        ViewportSize,
    )
    from playwright.sync_api._generated import LocatorAssertions

pytestmark = pytest.mark.integration

DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
SETTLE_TIMEOUT_MS = 30_000
HELD_OUT_SEED = 4242  # not a training seed of the demo model


@dataclass
class PageProblems:
    """What the page did that it should not: script errors, requests to other hosts."""

    base_url: str
    errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert self.errors == [], self.errors
        assert self.foreign_requests == [], self.foreign_requests


@pytest.fixture(scope="module")
def tiny_server(
    tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The tiny test model (always available: exported by the session fixture)."""
    log_path = tmp_path_factory.mktemp("server") / "uvicorn.log"
    with run_server(tiny_repo.root, tiny_repo.name, log_path) as live:
        yield live


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The bundled demo model, whose predictions mean something; skipped until it is trained."""
    if not (DEMO_MODEL / "model.json").is_file():
        pytest.skip(f"the demo model is not in {DEMO_MODEL} yet (trained by export/demo)")
    log_path = tmp_path_factory.mktemp("server") / "uvicorn.log"
    with run_server(DEMO_MODEL.parent, DEMO_MODEL.name, log_path) as live:
        yield live


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> LiveServer:
    """The demo model when it exists (its predictions mean something), else the tiny one."""
    name = "demo_server" if (DEMO_MODEL / "model.json").is_file() else "tiny_server"
    live: LiveServer = request.getfixturevalue(name)
    return live


def expect(target: Locator) -> LocatorAssertions:
    # Imported here: without Playwright the module still loads and its tests skip, saying why.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where screenshots go (gitignored): look at them."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def spec_of(server: LiveServer) -> ModelSpec:
    return ModelSpec.load(server.model_repo / server.model / "model.json")


class PageOpener(Protocol):
    def __call__(
        self, server: LiveServer, viewport: ViewportSize = ...
    ) -> tuple[Page, PageProblems]: ...


@pytest.fixture
def open_page(browser: Browser) -> Iterator[PageOpener]:
    """open_page(server, viewport) -> (page, problems); the page shows its models when returned."""
    contexts = []
    watched: list[PageProblems] = []

    def opener(server: LiveServer, viewport: ViewportSize = DESKTOP) -> tuple[Page, PageProblems]:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        problems = PageProblems(server.base_url)
        watched.append(problems)
        page.on("pageerror", lambda exc: problems.errors.append(f"page error: {exc}"))

        def on_console(message: Any) -> None:
            # The browser logs every 4xx answer to fetch(); the tests provoke some on purpose.
            if message.type == "error" and "Failed to load resource" not in message.text:
                problems.errors.append(f"console: {message.text}")

        def on_request(req: Any) -> None:
            url: str = req.url
            if not url.startswith((server.base_url + "/", "blob:", "data:")):
                problems.foreign_requests.append(url)

        page.on("console", on_console)
        page.on("request", on_request)
        page.goto(server.base_url + "/")
        expect(page.locator("#model")).to_be_enabled()
        return page, problems

    yield opener
    for context in contexts:
        context.close()
    for problems in watched:
        problems.check()


# ---- helpers ------------------------------------------------------------------------------


def png_payload(name: str, data: bytes, mime: str = "image/png") -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": data}


def upload(page: Page, files: list[FilePayload] | list[Path]) -> list[ElementHandle]:
    """Choose `files` in the file input and wait until every card is answered."""
    page.set_input_files("#files", files)
    return settle(page, len(files))


def settle(page: Page, count: int) -> list[ElementHandle]:
    # Locator waits, not wait_for_function: its polling evaluates strings in the page, which
    # the page's Content-Security-Policy (rightly) forbids.
    expect(page.locator("#results .card")).to_have_count(count, timeout=SETTLE_TIMEOUT_MS)
    unsettled = page.locator("#results .card:not([data-state=done]):not([data-state=error])")
    expect(unsettled).to_have_count(0, timeout=SETTLE_TIMEOUT_MS)
    return page.query_selector_all("#results .card")


def rerun(page: Page, count: int, change: Any) -> list[ElementHandle]:
    """Change a control (which classifies again) and wait for the new answers."""
    page.evaluate(
        "() => document.querySelectorAll('#results .card').forEach(c => c.dataset.state = 'old')"
    )
    change()
    return settle(page, count)


def bars(card: ElementHandle) -> list[tuple[str, float, str]]:
    """(label, score, shown text) per bar, top first."""
    rows: list[tuple[str, float, str]] = []
    for bar in card.query_selector_all(".bar"):
        label = bar.get_attribute("data-label")
        score = bar.get_attribute("data-score")
        assert label is not None and score is not None
        rows.append((label, float(score), bar.inner_text()))
    return rows


def facts(card: ElementHandle) -> dict[str, str]:
    return {
        str(dd.get_attribute("data-fact")): dd.inner_text()
        for dd in card.query_selector_all(".facts dd")
    }


def heat_stats(card: ElementHandle) -> dict[str, Any]:
    """The heat canvas: its size, the box of its drawn pixels, how many colours it holds."""
    stats: dict[str, Any] = card.eval_on_selector(
        ".heat",
        """canvas => {
            const {width, height} = canvas;
            const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
            let x0 = width, y0 = height, x1 = -1, y1 = -1, opaque = 0;
            const colours = new Set();
            for (let y = 0; y < height; y++) {
                for (let x = 0; x < width; x++) {
                    const o = (y * width + x) * 4;
                    if (data[o + 3] < 128) continue;
                    opaque++;
                    colours.add((data[o] << 16) | (data[o + 1] << 8) | data[o + 2]);
                    x0 = Math.min(x0, x); y0 = Math.min(y0, y);
                    x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
                }
            }
            return {width, height, box: [x0, y0, x1, y1], opaque, colours: colours.size,
                    hidden: canvas.hidden, opacity: getComputedStyle(canvas).opacity};
        }""",
    )
    return stats


def api_classify(server: LiveServer, name: str, data: bytes, mime: str, **params: Any) -> Any:
    """What the API answers for the same upload the page sent."""
    response = httpx.post(
        f"{server.base_url}/classify",
        params={"rollout": "true", **params},
        files=[("image", (name, data, mime))],
        timeout=30,
    )
    return response.status_code, response.json()


def check_card_against_api(
    card: ElementHandle, server: LiveServer, name: str, data: bytes, mime: str, **params: Any
) -> dict[str, Any]:
    """Bars, grid and heat placement on a settled card equal the API's answer; returns it."""
    spec = spec_of(server)
    status, answer = api_classify(server, name, data, mime, **params)
    assert status == 200, answer
    result = answer["results"][0]
    assert card.get_attribute("data-state") == "done", card.inner_text()

    shown = bars(card)
    assert len(shown) == int(params.get("top_k", 5))
    assert {label for label, _, _ in shown} <= set(spec.labels)
    assert [label for label, _, _ in shown] == [p["label"] for p in result["predictions"]]
    for (_, score, text), p in zip(shown, result["predictions"], strict=True):
        assert score == pytest.approx(p["score"], abs=1e-5)
        assert text.endswith("%")
    scores = [score for _, score, _ in shown]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < sum(scores) <= 1.0 + 1e-5

    gh, gw = result["grid"]
    P = spec.architecture.patch_size
    assert facts(card)["patch-grid"] == f"{gh} × {gw} ({gh * gw} patches of {P} px)"
    latency = facts(card)["latency"]
    assert "ms in the page" in latency and "server" in latency

    # The heat covers exactly the part of the image the model saw (the centre crop, or all).
    width, height = result["image_size"]
    if result["resize"] == "crop":
        expected = seen_box((width, height), crop_plan(width, height, spec))
    else:
        expected = (0, 0, width, height)
    heat = heat_stats(card)
    assert not heat["hidden"]
    assert heat["width"] * height == pytest.approx(heat["height"] * width, rel=0.02)
    scale = heat["width"] / width
    drawn = [v / scale for v in heat["box"]]
    assert drawn == pytest.approx(list(expected), abs=1.0 + 1.0 / scale)
    assert heat["opaque"] >= 0.9 * (drawn[2] - drawn[0]) * (drawn[3] - drawn[1]) * scale**2
    # Not one flat colour: the grid's values (max 1) are coloured and blended.
    assert heat["colours"] > 1
    return dict(result)


# ---- tests --------------------------------------------------------------------------------


def test_a_generated_png_shows_bars_grid_latency_and_heatmap(
    open_page: PageOpener, tiny_server: LiveServer, artifacts: Path
) -> None:
    page, _ = open_page(tiny_server)
    data = encode(smooth(160, 120, seed=3), "PNG")
    (card,) = upload(page, [png_payload("smooth.png", data)])
    check_card_against_api(card, tiny_server, "smooth.png", data, "image/png")
    x0, y0, x1, y1 = seen_box((160, 120), crop_plan(160, 120, spec_of(tiny_server)))
    assert facts(card)["model-saw"] == (
        f"centre {x1 - x0} × {y1 - y0} px of it, resized to 64 × 64 px (crop_pct 0.875)"
    )
    page.screenshot(path=artifacts / "page-generated.png", full_page=True)


def test_top_k_and_fit_rerun_the_request(open_page: PageOpener, tiny_server: LiveServer) -> None:
    page, _ = open_page(tiny_server)
    data = encode(smooth(200, 80, seed=4), "PNG")
    upload(page, [png_payload("wide.png", data)])

    (card,) = rerun(page, 1, lambda: page.check("#resize-fit"))
    result = check_card_against_api(card, tiny_server, "wide.png", data, "image/png", resize="fit")
    spec = spec_of(tiny_server)
    native = spec.architecture.native_tokens
    assert tuple(result["grid"]) == fit_grid(200, 80, native, 2 * native)
    assert "whole image" in facts(card)["model-saw"]

    def three() -> None:
        page.fill("#top-k", "3")
        page.press("#top-k", "Enter")

    (card,) = rerun(page, 1, three)
    check_card_against_api(card, tiny_server, "wide.png", data, "image/png", resize="fit", top_k=3)


def test_dropped_files_are_classified(open_page: PageOpener, tiny_server: LiveServer) -> None:
    page, _ = open_page(tiny_server)
    data = encode(smooth(120, 90, seed=9), "PNG")
    # What the browser hands the page when a file is dragged from the desktop and dropped.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            const zone = document.getElementById('drop');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true,
                                                        cancelable: true}));
            }
        }""",
        base64.b64encode(data).decode("ascii"),
    )
    (card,) = settle(page, 1)
    assert card.inner_text().startswith("dropped.png")
    check_card_against_api(card, tiny_server, "dropped.png", data, "image/png")
    assert page.eval_on_selector("#drop", "e => e.classList.contains('dragging')") is False


def test_a_broken_file_shows_the_api_error_word_for_word(
    open_page: PageOpener, tiny_server: LiveServer, artifacts: Path
) -> None:
    page, _ = open_page(tiny_server)
    good = encode(smooth(96, 96, seed=5), "PNG")
    broken = b"\x89PNG\r\n\x1a\n" + b"this is not the rest of a PNG file" * 4
    cards = upload(page, [png_payload("good.png", good), png_payload("broken.png", broken)])
    status, answer = api_classify(tiny_server, "broken.png", broken, "image/png")
    assert status == 400
    # One broken file fails only its own card.
    assert [c.get_attribute("data-state") for c in cards] == ["done", "error"]
    error = cards[1].query_selector(".error")
    assert error is not None and error.is_visible()
    assert error.get_attribute("role") == "alert"
    assert error.eval_on_selector(".detail", "e => e.textContent") == answer["detail"]
    assert error.eval_on_selector(".status-code", "e => e.textContent") == "HTTP 400"
    assert cards[1].query_selector_all(".bar") == []
    page.screenshot(path=artifacts / "page-error.png", full_page=True)


def test_a_bad_parameter_shows_the_api_error(
    open_page: PageOpener, tiny_server: LiveServer
) -> None:
    page, _ = open_page(tiny_server)
    data = encode(smooth(64, 64, seed=6), "PNG")
    upload(page, [png_payload("a.png", data)])

    def zero() -> None:
        page.fill("#top-k", "0")
        page.press("#top-k", "Enter")

    (card,) = rerun(page, 1, zero)
    status, answer = api_classify(tiny_server, "a.png", data, "image/png", top_k=0)
    assert status == 422
    assert card.get_attribute("data-state") == "error"
    assert card.eval_on_selector(".error .detail", "e => e.textContent") == answer["detail"]


def test_the_page_works_from_the_keyboard(open_page: PageOpener, tiny_server: LiveServer) -> None:
    page, _ = open_page(tiny_server)
    # Every control has a name a screen reader can read out.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')]
            .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim()
                         && !e.getAttribute('aria-label'))
            .map(e => e.id || e.outerHTML)"""
    )
    assert unnamed == []

    # The first Tab stop is the file input (the drop zone), and its focus is visible.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"
    outline = page.eval_on_selector(".drop-label", "e => getComputedStyle(e).outlineStyle")
    assert outline == "solid"

    data = encode(smooth(128, 128, seed=7), "PNG")
    (card,) = upload(page, [png_payload("k.png", data)])

    # The opacity slider, by keyboard: Home, End and arrows change the heat layer live.
    page.focus("#opacity")
    page.keyboard.press("Home")
    assert heat_stats(card)["opacity"] == "0"
    assert page.inner_text("#opacity-value") == "0%"
    page.keyboard.press("End")
    assert heat_stats(card)["opacity"] == "1"
    page.keyboard.press("ArrowLeft")
    assert heat_stats(card)["opacity"] == "0.95"

    # The patch grid toggle draws lines over the picture.
    def line_pixels() -> int:
        count: int = card.eval_on_selector(
            ".gridlines",
            """c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data
                .filter((v, i) => i % 4 === 3 && v > 0).length""",
        )
        return count

    before = line_pixels()
    page.focus("#show-grid")
    page.keyboard.press("Space")
    assert page.is_checked("#show-grid")
    assert line_pixels() > before


def test_real_photos_at_desktop_and_phone_width(
    open_page: PageOpener, server: LiveServer, artifacts: Path
) -> None:
    need_folder(PHOTOS, "the shared test photos")
    photos = sorted(PHOTOS.glob("*.JPEG"))[:2]
    assert photos, f"no photos in {PHOTOS}"
    for viewport, shot in ((DESKTOP, "page.png"), (PHONE, "page-phone.png")):
        page, _ = open_page(server, viewport)
        cards = upload(page, photos)
        for card, photo in zip(cards, photos, strict=True):
            check_card_against_api(card, server, photo.name, photo.read_bytes(), "image/jpeg")
        # Readable at phone width: nothing wider than the screen, the controls on it.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a {viewport} screen"
        for selector in ("#files + label", "#model", "#resize-fit", "#opacity", "#classify"):
            box = page.locator(selector).bounding_box()
            assert (
                box is not None and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
            )
        page.screenshot(path=artifacts / shot, full_page=True)


def test_the_demo_model_names_shapes_on_the_page(
    open_page: PageOpener, demo_server: LiveServer, artifacts: Path
) -> None:
    batch = generate(4, seed=HELD_OUT_SEED)
    payloads = [
        png_payload(f"{CLASSES[label]}.png", encode(Image.fromarray(image), "PNG"))
        for image, label in zip(batch.images, batch.labels, strict=True)
    ]
    page, _ = open_page(demo_server)
    cards = upload(page, payloads)
    right = 0
    for card, payload, label in zip(cards, payloads, batch.labels, strict=True):
        check_card_against_api(
            card, demo_server, payload["name"], payload["buffer"], payload["mimeType"]
        )
        right += bars(card)[0][0] == CLASSES[label]
    assert right >= 3, f"{right} of 4 shapes named right"
    page.screenshot(path=artifacts / "page-shapes.png", full_page=True)


def test_an_exif_rotated_photo_is_drawn_the_way_the_server_saw_it(
    open_page: PageOpener, tiny_server: LiveServer
) -> None:
    image = smooth(160, 96, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    page, _ = open_page(tiny_server)
    (card,) = upload(page, [png_payload("rotated.jpg", data, "image/jpeg")])
    result = check_card_against_api(card, tiny_server, "rotated.jpg", data, "image/jpeg")
    assert result["image_size"] == [96, 160]
    # The browser applies the orientation too: the photo's pixels fill a portrait canvas.
    natural = page.evaluate(
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const bitmap = await createImageBitmap(new Blob([bytes], {type: 'image/jpeg'}));
            return [bitmap.width, bitmap.height];
        }""",
        base64.b64encode(data).decode("ascii"),
    )
    assert natural == [96, 160]
    assert math.isclose(
        heat_stats(card)["width"] / heat_stats(card)["height"], 96 / 160, rel_tol=0.02
    )


def test_the_demo_models_learned_panels_on_the_page(
    open_page: PageOpener, demo_server: LiveServer, artifacts: Path
) -> None:
    page, _ = open_page(demo_server)
    show = page.locator("#learned-show")
    expect(show).to_be_enabled()
    show.click()
    panels = page.locator("#learned-panels")
    expect(panels).to_be_visible(timeout=SETTLE_TIMEOUT_MS)
    expect(page.locator("#learned-filters-caption")).to_contain_text(
        "First 28 principal components of the patch embedding's 8x8 RGB filters"
    )
    expect(page.locator("#learned-similarity-caption")).to_contain_text("native 8×8 grid")
    expect(page.locator("#learned-distance-caption")).to_contain_text("over 1000 held-out images")
    for img in ("#learned-filters", "#learned-similarity", "#learned-distance"):
        width = page.locator(img).evaluate("(node) => node.naturalWidth")
        assert width > 0, img
    expect(page.locator("#learned-resampled-figure")).to_be_hidden()
    # A resampled grid, as the served graph resamples its position embeddings.
    page.fill("#learned-grid", "5x11")
    page.press("#learned-grid", "Enter")
    expect(page.locator("#learned-resampled-caption")).to_contain_text("Resampled to 5×11")
    # A bad grid shows the API's own words.
    page.fill("#learned-grid", "0x3")
    show.click()
    expect(page.locator("#learned-error")).to_have_text(
        "HTTP 422 grid 0x3: both sides must be at least 1 patch"
    )
    # One image's attention distance, measured by the server on the rollout graph.
    image = generate(1, seed=HELD_OUT_SEED).images[0]
    page.set_input_files(
        "#learned-image", [png_payload("shape.png", encode(Image.fromarray(image), "PNG"))]
    )
    expect(page.locator("#learned-image-caption")).to_contain_text(
        "shape.png: mean attention distance per head and depth over its 8×8 grid",
        timeout=SETTLE_TIMEOUT_MS,
    )
    page.screenshot(path=artifacts / "page-learned.png", full_page=True)
