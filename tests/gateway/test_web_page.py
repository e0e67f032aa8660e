"""The web page in real headless Chromium (Debian's, driven by Playwright) against the fake services.

Skips locally when /usr/bin/chromium is missing; under CI=true that is a failure (``apt-get install chromium``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, FilePayload, Page, Request, Route, async_playwright, expect

from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.services.gateway.routes.system import PAGE_POLICY
from tests.conftest import require
from tests.gateway.fakes import strip_png
from tests.gateway.harness import FakeMesh, build_gateway, close_gateway, serve_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_PRESENT = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium."""
    require(CHROMIUM_PRESENT, f"Chromium at {CHROMIUM}")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser, mesh: FakeMesh) -> AsyncIterator[Page]:
    """The page served by a gateway over real HTTP, with browser errors collected."""
    mesh.fakes.queue.hold = False
    mesh.fakes.queue.fail_next = False
    app, ctx = build_gateway(mesh.gateway_settings())
    errors: list[str] = []
    async with serve_app(app) as url:
        opened = await browser.new_page()
        opened.set_default_timeout(TIMEOUT_MS)
        opened.on("pageerror", lambda error: errors.append(str(error)))
        await opened.goto(url + "/")
        yield opened
        await opened.close()
    await close_gateway(ctx)
    assert not errors, errors


async def _upload(page: Page) -> None:
    await page.set_input_files(
        "#file-input", files=[FilePayload(name="strip.png", mimeType="image/png", buffer=strip_png())]
    )
    await expect(page.locator("#upload-status")).to_have_text(re.compile("^Uploaded"))
    await expect(page.locator("#upload-progress")).to_have_attribute("value", "100")


def _is_upload(request: Request) -> bool:
    return request.method == "POST" and "/v1/images" in request.url


async def test_upload_sends_the_file_raw_with_its_name_in_the_query(page: Page, mesh: FakeMesh) -> None:
    """The page sends the file as the raw body (streamed on by the gateway) with its name in the query, and
    declares no type: the file service detects it from the bytes."""
    async with page.expect_request(_is_upload) as raw_info:
        await _upload(page)
    raw = await raw_info.value
    assert (await raw.all_headers())["content-type"] == "application/octet-stream"
    assert raw.url.endswith("/v1/images?filename=strip.png")
    assert mesh.fakes.files.upload_metadata[-1].content_type == ""


async def test_a_png_named_jpg_uploads_from_the_page(page: Page, mesh: FakeMesh) -> None:
    """A PNG saved as ``.jpg`` (which the browser guesses is image/jpeg) uploads as the PNG it is: the page
    sent the browser's guess as the declared type, and the file service refused the mismatch."""
    await page.set_input_files(
        "#file-input", files=[FilePayload(name="shot.jpg", mimeType="image/jpeg", buffer=strip_png(100, 30))]
    )
    await expect(page.locator("#upload-status")).to_have_text(re.compile("^Uploaded"))
    await expect(page.locator("#preview-caption")).to_contain_text(re.compile(r"^shot\.jpg · 100.30 · PNG"))
    assert mesh.fakes.files.upload_metadata[-1].content_type == ""


async def test_a_failed_upload_says_which_photo_jobs_still_use(page: Page) -> None:
    """After a good upload, a file the mesh refuses shows its error and names the photo that stays selected,
    whose preview otherwise read as the refused file's."""
    await _upload(page)
    await page.set_input_files(
        "#file-input", files=[FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"not a picture")]
    )
    status = page.locator("#upload-status")
    await expect(status).to_have_text(
        re.compile(r"^Upload failed: .+\. Jobs still use the photo shown below \(strip\.png\)\.$")
    )
    await expect(page.locator("#submit-job")).to_be_enabled()


async def _submit(page: Page) -> str:
    """Submit the form; returns the new job's row selector."""
    # Cleared first, so that an earlier submit's "Submitted job ..." is not taken for this one's.
    await page.evaluate("document.querySelector('#submit-status').textContent = ''")
    await page.click("#submit-job")
    status = page.locator("#submit-status")
    await expect(status).to_have_text(re.compile(r"^Submitted job [0-9a-f]{8}\."))
    short = (await status.inner_text()).removeprefix("Submitted job ").removesuffix(".")
    return f'#queue tr[data-job^="{short}"]'


async def test_upload_submit_and_verdict_on_screen(page: Page) -> None:
    """Upload -> choose a filter and the strip reader -> submit -> the live queue ends SUCCEEDED, its row
    naming the job's work, and the verdict shows with both lines drawn on the photo."""
    await expect(page.locator("#filter-grayscale")).to_be_visible()
    await expect(page.locator("#param-gaussian_blur-sigma")).to_have_value("1")
    await expect(page.locator("#model-select")).to_have_value("strip-reader")
    await _upload(page)
    await page.check("#filter-grayscale")
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    # Each row says what its job does, so that jobs can be told apart by more than their ids.
    await expect(page.locator(f"{row} td.work")).to_have_text("grayscale → strip-reader")
    await expect(page.locator("#verdict")).to_have_text("Verdict: POSITIVE")
    # A polled list fetched before the stream's last event carries an older snapshot: it must not win.
    await page.evaluate(
        """(row) => {
            const id = document.querySelector(row).dataset.job;
            const job = state.jobs.get(id);
            showJob({ ...job, state: "RUNNING", updated_at: "2000-01-01T00:00:00.000000Z" });
        }""",
        row,
    )
    assert await page.get_attribute(row, "data-state") == "SUCCEEDED"  # at once: the next poll would mend it
    await expect(page.locator("#strip-canvas")).to_have_attribute("data-lines", "2")
    await expect(page.locator("#reading")).to_contain_text("T/C ratio")
    await expect(page.locator("#reading")).to_contain_text("grayscale → strip-reader (version 1)")


async def test_the_lines_are_drawn_on_the_image_the_model_read(page: Page) -> None:
    """With filters, the model reads their output, in whose pixels its line positions are: the lines are
    drawn on that image (half the photo's size after resize 0.5), with the photo shown beside it. They were
    drawn on the photo, in the wrong place whenever a filter moved the strip. Both are shown at one width:
    the smaller filtered image was drawn at its own size beside the photo."""
    await _upload(page)
    await page.check("#filter-resize")
    await page.fill("#param-resize-scale", "0.5")
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    await expect(page.locator("#canvas-caption")).to_have_text(
        "Filtered image with the detected C and T lines"
    )
    await expect(page.locator("#strip-canvas")).to_have_attribute("data-lines", "2")
    assert await page.evaluate("document.querySelector('#strip-canvas').width") == 320 // 2
    await expect(page.locator("#original-figure")).to_be_visible()
    await expect(page.locator("#original-image")).to_have_js_property("complete", True)
    canvas_box = await page.locator("#strip-canvas").bounding_box()
    photo_box = await page.locator("#original-image").bounding_box()
    assert canvas_box is not None
    assert photo_box is not None
    assert canvas_box["width"] == pytest.approx(photo_box["width"], abs=1)


async def test_the_queue_table_keeps_the_newest_fifty_rows(page: Page) -> None:
    """Polling adds a row for every new job a busy mesh lists; the table keeps 50, dropping the oldest
    finished ones (it grew without end, one row per job, during a load test)."""
    await _upload(page)
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    await page.evaluate(
        """(row) => {
            const job = state.jobs.get(document.querySelector(row).dataset.job);
            for (let i = 0; i < 60; i += 1) {
                showJob({ ...job, id: `00000000-0000-4000-8000-${String(i).padStart(12, "0")}` });
            }
        }""",
        row,
    )
    assert await page.locator("#queue tbody tr").count() == 50
    assert await page.evaluate("state.jobs.size") == 50
    await expect(page.locator('#queue tr[data-job="00000000-0000-4000-8000-000000000059"]')).to_be_visible()


async def test_a_bad_value_in_an_unchosen_filter_does_not_block_the_submit(page: Page) -> None:
    """Only a chosen filter's fields are enabled: a value out of range in a filter that is not sent was
    checked by the browser all the same, and the submit silently did nothing."""
    await _upload(page)
    sigma = page.locator("#param-gaussian_blur-sigma")
    await expect(sigma).to_be_disabled()
    await page.check("#filter-gaussian_blur")
    await expect(sigma).to_be_enabled()
    await sigma.fill("500")
    await page.uncheck("#filter-gaussian_blur")
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")


async def test_cancel_a_queued_job(page: Page, mesh: FakeMesh) -> None:
    """A job held in the queue shows QUEUED with its position, and its Cancel button cancels it."""
    mesh.fakes.queue.hold = True
    try:
        await _upload(page)
        row = await _submit(page)
        await expect(page.locator(row)).to_have_attribute("data-state", "QUEUED")
        await expect(page.locator(f"{row} .position")).not_to_have_text(
            "\u2013"
        )  # the page's dash for "not queued"
        await page.click(f'{row} button[data-action="cancel"]')
        await expect(page.locator(row)).to_have_attribute("data-state", "CANCELLED")
    finally:
        mesh.fakes.queue.release()


async def test_a_busy_queue_never_stalls_the_page(page: Page, mesh: FakeMesh) -> None:
    """Eight unfinished jobs hold at most three event streams, so uploads and calls still get one of the
    browser's six connections to the host: a stream per job stalled the seventh submit, and an upload after
    a reload, behind a busy queue. The page reloaded with them streams none and still shows them QUEUED."""
    mesh.fakes.queue.hold = True
    try:
        await _upload(page)
        rows = [await _submit(page) for _ in range(8)]
        assert await page.evaluate("state.streams.size") == 3
        await expect(page.locator(rows[0])).to_have_attribute("data-state", "QUEUED")
        await page.reload()
        await expect(page.locator(rows[0])).to_have_attribute("data-state", "QUEUED")
        assert await page.evaluate("state.streams.size") == 0
        await _upload(page)
        # The list is polled every 3 s; a row that did not change keeps its buttons, so a click is not lost.
        cancel = await page.locator(f'{rows[0]} button[data-action="cancel"]').element_handle()
        assert cancel is not None
        await page.wait_for_timeout(3500)
        assert await cancel.evaluate("button => button.isConnected")
    finally:
        mesh.fakes.queue.release()


async def test_an_event_stream_refused_by_the_gateway_frees_its_slot_for_the_polled_list(
    page: Page, mesh: FakeMesh
) -> None:
    """An event stream whose (re)connect gets another status than 200 (here 503; a 429, 401 or 404 alike) is
    closed by the browser for good: the page lets it go, so that it holds none of the three stream slots and
    its job's row follows the polled list to the end. The dead stream was kept for ever."""
    await page.route(
        "**/v1/jobs/*/events*",
        lambda route: route.fulfill(
            status=503, content_type="application/json", body='{"error": {"code": "UNAVAILABLE"}}'
        ),
    )
    mesh.fakes.queue.hold = True
    try:
        await _upload(page)
        row = await _submit(page)
        await expect(page.locator(row)).to_have_attribute("data-state", "QUEUED")
        await page.wait_for_function("state.streams.size === 0")
    finally:
        mesh.fakes.queue.release()
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")


async def test_no_site_can_frame_the_page_and_the_docs_still_load(browser: Browser, mesh: FakeMesh) -> None:
    """Every response says nosniff and that no other page may frame it (CSP frame-ancestors 'none' and
    X-Frame-Options DENY): any site could show the page, with its Cancel and Retry buttons and its API key
    field, in a frame. /docs (Swagger UI from vendored files and an inline script) still renders."""
    app, ctx = build_gateway(mesh.gateway_settings())
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/docs", "/static/app.js", "/openapi.json", "/v1/jobs/missing"):
                headers = (await client.get(path)).headers
                assert headers["x-content-type-options"] == "nosniff", path
                (policy,) = headers.get_list("content-security-policy")
                assert "frame-ancestors 'none'" in policy.split("; "), path
                assert headers["x-frame-options"] == "DENY", path
            opened = await browser.new_page()
            opened.set_default_timeout(TIMEOUT_MS)
            try:
                await opened.goto(url + "/docs")
                await expect(opened.locator(".opblock").first).to_be_visible()
                await opened.set_content(f'<iframe src="{url}/"></iframe>')
                (framed,) = opened.main_frame.child_frames
                await framed.wait_for_load_state()
                assert await framed.locator("#file-input").count() == 0
            finally:
                await opened.close()
    finally:
        await close_gateway(ctx)


async def test_retry_a_failed_job(page: Page, mesh: FakeMesh) -> None:
    """A failed job shows its error category and a Retry button, which runs it again to SUCCEEDED, as the
    first attempt of its new run (1/3, not 2/3: the run has a fresh budget)."""
    mesh.fakes.queue.fail_next = True
    await _upload(page)
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "FAILED")
    await expect(page.locator(row)).to_contain_text("DATA")
    await page.click(f'{row} button[data-action="retry"]')
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    await expect(page.locator(row)).to_contain_text("1/3")


async def test_a_retried_jobs_attempt_is_told_within_its_run(page: Page) -> None:
    """A job retried by its user after 2 of 2 attempts reads "1 of 2" in its new run, with its overall
    attempt beside it; it read "3 of 2" before."""
    told = await page.evaluate("attemptOf({attempt: 3, run_attempt: 1, max_attempts: 2})")
    assert told == "1 of 2 (attempt 3 overall)"
    assert await page.evaluate("attemptOf({attempt: 2, run_attempt: 2, max_attempts: 3})") == "2 of 3"


async def test_changing_the_api_key_reloads_the_models_without_doubling_them(page: Page) -> None:
    """Filters and models are loaded again when the API key changes; the models were appended to the list
    each time, so every change added another copy of each."""
    await expect(page.locator("#model-select option")).to_have_count(2)
    await page.click("details.credentials summary")
    for key in ("first-key", "second-key"):
        await page.fill("#api-key", key)
        await page.press("#api-key", "Tab")
    await page.wait_for_timeout(500)
    await expect(page.locator("#model-select option")).to_have_count(2)
    await expect(page.locator("#model-select")).to_have_value("strip-reader")


async def test_health_panel(page: Page) -> None:
    """The health panel lists every service and its dependencies from /v1/health, with the overall status."""
    await expect(page.locator("#health-status")).to_have_text("ok")
    for name in ("file service", "image service", "inference service", "queue service", "gpu"):
        await expect(page.locator(f'#health tr[data-component="{name}"]').first).to_be_visible()
    await expect(page.locator('#health tr[data-component="file service"] .status-ok')).to_have_text("ok")
    await expect(page.locator("#queue-depth")).to_contain_text("Jobs by state")


async def test_the_page_loads_without_a_failed_request_or_console_error(
    browser: Browser, mesh: FakeMesh
) -> None:
    """Opening the page asks for nothing that fails: the browser's own /favicon.ico request was a 404,
    logged as a console error on every visit."""
    app, ctx = build_gateway(mesh.gateway_settings())
    failed: list[str] = []
    async with serve_app(app) as url:
        opened = await browser.new_page()
        opened.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        opened.on("console", lambda m: failed.append(f"console: {m.text}") if m.type == "error" else None)
        await opened.goto(url + "/", wait_until="networkidle")
        await expect(opened.locator("#health-status")).to_have_text("ok")
        await opened.close()
    await close_gateway(ctx)
    assert failed == []


async def test_enter_in_the_api_key_field_keeps_the_page_and_applies_the_key(page: Page) -> None:
    """The key's field sits in a form (browsers expect one around a password field); Enter there stores the
    key and must not submit that form, which would reload the page."""
    await _upload(page)
    await page.click("details.credentials summary")
    await page.fill("#api-key", "entered-key")
    await page.press("#api-key", "Enter")
    await page.wait_for_timeout(300)
    assert await page.evaluate("localStorage.getItem('mesh.apiKey')") == "entered-key"
    await expect(page.locator("#upload-status")).to_have_text(re.compile("^Uploaded"))  # not reloaded


@pytest.mark.parametrize(("width", "height"), [(390, 844), (768, 1024), (1400, 1000), (1920, 1080)])
async def test_the_page_fits_the_screen_at_every_width(page: Page, width: int, height: int) -> None:
    """Nothing makes the page wider than the screen (the cards' 22rem minimum and the tables did on a
    phone: a 390 px screen scrolled sideways to 709 px); a wide table scrolls inside its card. On a wide
    screen the two top cards fill the row, where a third, empty column was left beside them."""
    await page.set_viewport_size({"width": width, "height": height})
    await _upload(page)
    await page.check("#filters input[type=checkbox] >> nth=0")
    await page.click("#submit-job")
    await expect(page.locator("#queue tbody tr").first).to_be_visible()
    await expect(page.locator("#health-status")).to_have_text("ok")
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a {width} px screen"
    job_card = await page.locator("section[aria-labelledby=job-title]").bounding_box()
    queue_card = await page.locator("section[aria-labelledby=queue-title]").bounding_box()
    assert job_card is not None
    assert queue_card is not None
    assert abs(job_card["x"] + job_card["width"] - (queue_card["x"] + queue_card["width"])) < 1


async def test_a_failed_job_shows_why_in_the_result_panel(page: Page, mesh: FakeMesh) -> None:
    """The job just submitted fails: the result panel says so, with the error's message and category, where it
    kept showing an earlier job's result and the message was nowhere on the page."""
    await _upload(page)
    first = await _submit(page)
    await expect(page.locator(first)).to_have_attribute("data-state", "SUCCEEDED")
    await expect(page.locator("#verdict")).to_have_text("Verdict: POSITIVE")
    mesh.fakes.queue.fail_next = True
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "FAILED")
    await expect(page.locator("#verdict")).to_contain_text("FAILED")
    await expect(page.locator("#reading")).to_contain_text("the image is unreadable (DATA)")
    await expect(page.locator("#result-images")).to_be_hidden()
    await page.click(f"{first} button:has-text('Show')")
    await expect(page.locator("#verdict")).to_have_text("Verdict: POSITIVE")
    await expect(page.locator("#result-images")).to_be_visible()


async def test_the_result_panel_waits_for_the_job_just_submitted(page: Page, mesh: FakeMesh) -> None:
    """While the job just submitted is queued, the panel names it and its place instead of an earlier result."""
    await _upload(page)
    first = await _submit(page)
    await expect(page.locator(first)).to_have_attribute("data-state", "SUCCEEDED")
    mesh.fakes.queue.hold = True
    try:
        await _submit(page)
        await expect(page.locator("#result")).to_be_hidden()
        await expect(page.locator("#result-empty")).to_have_text(
            re.compile(
                r"^Job \w{8} is QUEUED, number \d+ in the queue; its result appears here when it ends\.$"
            )
        )
    finally:
        mesh.fakes.queue.release()


async def test_every_quality_flag_is_told_in_words(page: Page) -> None:
    """Each of the model's quality flags reads as advice for the person taking the photo, not as an enum
    name; a flag the page does not know yet still shows, as its name."""
    flags = [
        value.name.removeprefix("QUALITY_FLAG_")
        for value in inference_pb.QualityFlag.DESCRIPTOR.values
        if value.number != 0
    ]
    advice = await page.evaluate("QUALITY_ADVICE")
    assert sorted(advice) == sorted(flags)
    assert await page.evaluate("qualityText(['BLUR', 'A_NEW_FLAG'])") == (
        "blurred: hold still and let the camera focus; A_NEW_FLAG"
    )
    assert await page.evaluate("qualityText([])") == "no problems found"


async def test_an_invalid_reading_says_no_line_was_found_and_how_to_retake(page: Page) -> None:
    """A reading without lines is captioned as such (it said "with the detected C and T lines" over a
    picture without either), and its quality flag reads as advice."""
    await _upload(page)
    await page.evaluate(
        """showResult({
          id: "0123456789abcdef", state: "SUCCEEDED", image_id: state.imageId, attempt: 1, max_attempts: 3,
          result: { output_image_id: state.imageId, prediction: { strip_reading: {
            verdict: "INVALID", t_to_c_ratio: 0, confidence: 0.9, quality_flags: ["STRIP_NOT_FOUND"],
            control_line: { present: false }, test_line: { present: false } } } },
        })"""
    )
    await expect(page.locator("#verdict")).to_have_text("Verdict: INVALID")
    await expect(page.locator("#canvas-caption")).to_have_text("Photo (no line found)")
    await expect(page.locator("#reading")).to_contain_text("no test strip found: photograph the strip")
    await expect(page.locator("#strip-canvas")).to_have_attribute("data-lines", "0")


async def test_a_table_wider_than_the_screen_can_be_scrolled_from_the_keyboard(page: Page) -> None:
    """On a phone the queue and health tables scroll inside their cards; each scrolling region takes focus
    and has a name, so a keyboard can reach and scroll it (axe-core's scrollable-region-focusable: the health
    table's was not)."""
    await page.set_viewport_size({"width": 390, "height": 800})
    regions = page.locator(".table-scroll")
    assert await regions.count() == 2
    for index in range(2):
        region = regions.nth(index)
        await expect(region).to_have_attribute("tabindex", "0")
        await expect(region).to_have_attribute("role", "region")
        await expect(region).to_have_attribute("aria-label", re.compile(r"^(Queue|Health) table$"))
    await expect(page.locator("#health tbody tr").first).to_be_visible()
    health = regions.nth(1)
    assert await health.evaluate("el => el.scrollWidth > el.clientWidth")  # it does scroll at this width
    await health.focus()
    await page.keyboard.press("ArrowRight")
    await page.wait_for_function("el => el.scrollLeft > 0", arg=await health.element_handle(), timeout=5000)


async def _upload_image(page: Page, data: bytes, name: str = "strip.png") -> str:
    """Upload ``data`` from the page; returns the stored image's id."""
    await page.set_input_files(
        "#file-input", files=[FilePayload(name=name, mimeType="image/png", buffer=data)]
    )
    await expect(page.locator("#upload-status")).to_have_text(re.compile("^Uploaded"))
    image_id: str = await page.evaluate("state.imageId")
    return image_id


def _finished(job_id: str, image_id: str, output_id: str | None = None) -> dict[str, Any]:
    """A job that succeeded without a model, as the API lists it (its output is its photo unless given)."""
    return {
        "id": job_id,
        "state": "SUCCEEDED",
        "image_id": image_id,
        "attempt": 1,
        "run_attempt": 1,
        "max_attempts": 3,
        "pipeline": [],
        "model": "",
        "result": {"output_image_id": output_id or image_id, "prediction": None},
    }


FIRST_JOB = "aaaaaaaa-0000-4000-8000-000000000001"
SECOND_JOB = "bbbbbbbb-0000-4000-8000-000000000002"


async def test_a_slow_picture_of_the_job_shown_before_is_not_drawn_under_the_next_result(page: Page) -> None:
    """Show a job, then at once another: the first one's picture, fetched slowly, arrives last and must not be
    drawn under the second one's verdict (it was: one test's photo and lines beside another's verdict)."""
    first = await _upload_image(page, strip_png(320, 80))
    second = await _upload_image(page, strip_png(100, 30))  # the page's own photo: drawn without a fetch
    held: list[str] = []

    async def slow(route: Route) -> None:
        held.append(route.request.url)
        await asyncio.sleep(1.5)
        await route.continue_()

    await page.route(f"**/v1/images/{first}/content", slow)
    await page.evaluate(
        "([a, b]) => { selectResult(a); selectResult(b); }",
        [_finished(FIRST_JOB, first), _finished(SECOND_JOB, second)],
    )
    canvas = page.locator("#strip-canvas")
    await expect(canvas).to_have_js_property("width", 100)
    await page.wait_for_timeout(2000)  # the first job's picture has come by now
    assert held, "the first job's picture was fetched"
    assert await canvas.evaluate("canvas => canvas.width") == 100
    await expect(page.locator("#verdict")).to_have_text("Job bbbbbbbb succeeded (no model)")


async def test_a_picture_that_cannot_be_fetched_leaves_the_result_blank_and_says_so(page: Page) -> None:
    """A result whose image is gone (deleted, 404) shows no picture and says it is unavailable: the canvas
    kept the job shown before's photo and lines under this job's verdict."""
    photo = await _upload_image(page, strip_png(100, 30))
    await page.evaluate("(job) => selectResult(job)", _finished(FIRST_JOB, photo))
    canvas = page.locator("#strip-canvas")
    await expect(canvas).to_have_js_property("width", 100)
    gone = "00000000-0000-4000-8000-00000000dead"
    await page.evaluate("(job) => selectResult(job)", _finished(SECOND_JOB, gone))
    await expect(page.locator("#canvas-caption")).to_have_text("Photo unavailable (HTTP 404)")
    assert await canvas.evaluate("canvas => canvas.width") == 0
    await expect(canvas).to_have_attribute("data-lines", "0")
    # The photo beside a filtered image alike.
    await page.evaluate("(job) => selectResult(job)", _finished(FIRST_JOB, gone, photo))
    await expect(canvas).to_have_js_property("width", 100)
    await expect(page.locator("#original-caption")).to_have_text(
        "Photo before the filters: unavailable (HTTP 404)"
    )
    await expect(page.locator("#original-image")).not_to_have_attribute("src", re.compile("."))


async def test_showing_results_gives_back_the_images_it_fetched(page: Page) -> None:
    """Each result fetched its pictures as blob: URLs that were never revoked (about 200 KB a click kept until
    the tab closed); now only the photo on screen holds one."""
    photo = await _upload_image(page, strip_png(320, 80))
    output = await _upload_image(page, strip_png(160, 40))
    await _upload_image(page, strip_png(100, 30))  # the page's own photo is yet another
    await page.evaluate(
        """() => {
            window.liveBlobs = new Set();
            const create = URL.createObjectURL.bind(URL);
            const revoke = URL.revokeObjectURL.bind(URL);
            URL.createObjectURL = (blob) => { const url = create(blob); liveBlobs.add(url); return url; };
            URL.revokeObjectURL = (url) => { liveBlobs.delete(url); revoke(url); };
        }"""
    )
    for _ in range(5):
        await page.evaluate("(job) => showResult(job)", _finished(FIRST_JOB, photo, output))
    await expect(page.locator("#strip-canvas")).to_have_js_property("width", 160)
    assert await page.evaluate("[...liveBlobs]") == [await page.get_attribute("#original-image", "src")]


async def test_a_running_jobs_cancel_keeps_the_keyboard_focus_while_its_row_updates(
    page: Page, mesh: FakeMesh
) -> None:
    """A progress change updates the row in place: it rebuilt the row, taking the keyboard focus off Cancel
    (and losing clicks on it) about every 0.6 s while a job ran. Enter then cancels, and the row's Retry
    takes the focus Cancel had."""
    mesh.fakes.queue.hold = True
    try:
        await _upload(page)
        row = await _submit(page)
        await expect(page.locator(row)).to_have_attribute("data-state", "QUEUED")
        job_id = await page.get_attribute(row, "data-job")
        assert job_id is not None
        cancel = page.locator(f'{row} button[data-action="cancel"]')
        await cancel.focus()
        button = await cancel.element_handle()
        mesh.fakes.queue.beat(job_id, 0.5)
        await expect(page.locator(f"{row} progress")).to_have_js_property("value", 0.5)
        assert await button.evaluate("button => button.isConnected && document.activeElement === button")
        await page.keyboard.press("Enter")
        await expect(page.locator(row)).to_have_attribute("data-state", "CANCELLED")
        assert await page.evaluate("document.activeElement.dataset.action") == "retry"
    finally:
        mesh.fakes.queue.release()


async def test_a_double_click_on_submit_queues_one_job(page: Page) -> None:
    """Submit is disabled (and busy) until its answer comes: a double click made two jobs for one photo."""
    await _upload(page)
    posts: list[str] = []
    page.on(
        "request",
        lambda r: posts.append(r.url) if r.method == "POST" and r.url.endswith("/v1/jobs") else None,
    )
    await page.dblclick("#submit-job")
    await expect(page.locator("#submit-status")).to_have_text(re.compile(r"^Submitted job"))
    await page.wait_for_timeout(500)
    assert len(posts) == 1
    await expect(page.locator("#submit-job")).to_be_enabled()
    await expect(page.locator("#submit-job")).not_to_have_attribute("aria-busy", "true")


async def test_a_submit_sent_again_after_its_answer_was_lost_gets_the_same_job(page: Page) -> None:
    """Each form state's submit carries one Idempotency-Key: sent again after its answer was lost (the job
    was queued all the same), it gets that job back instead of a second one. Once answered, the same form
    again is a new job with a new key."""
    await _upload(page)
    keys: list[str | None] = []
    queued: list[str] = []

    async def lose_the_first_answer(route: Route) -> None:
        keys.append(await route.request.header_value("idempotency-key"))
        if len(keys) > 1:
            await route.continue_()
            return
        response = await route.fetch()
        queued.append((await response.json())["id"])
        await route.abort()

    await page.route(lambda url: url.endswith("/v1/jobs"), lose_the_first_answer)
    await page.click("#submit-job")
    await expect(page.locator("#submit-status")).to_have_text(re.compile(r"^Submit failed"))
    row = await _submit(page)
    assert keys[0]
    assert keys[1] == keys[0]
    assert await page.get_attribute(row, "data-job") == queued[0]
    await _submit(page)
    assert keys[2] not in (None, keys[1])


async def test_a_double_click_on_retry_sends_one_retry(page: Page, mesh: FakeMesh) -> None:
    """Retry is busy until its answer comes: a double click sent two, and the second was refused with
    "Retry failed: FAILED_PRECONDITION"."""
    mesh.fakes.queue.fail_next = True
    await _upload(page)
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "FAILED")
    retries: list[str] = []
    page.on("request", lambda r: retries.append(r.url) if r.url.endswith(":retry") else None)
    await page.dblclick(f'{row} button[data-action="retry"]')
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    await page.wait_for_timeout(300)
    assert len(retries) == 1
    await expect(page.locator("#submit-status")).not_to_contain_text("Retry failed")


async def test_a_photo_chosen_while_an_upload_runs_is_not_uploaded_beside_it(page: Page) -> None:
    """While an upload runs, the drop zone is busy, another choice is ignored and Submit waits: two uploads
    raced, and whichever ended last became the jobs' photo."""
    await _upload(page)
    sent: list[str] = []

    async def slow(route: Route) -> None:
        sent.append(route.request.url)
        await asyncio.sleep(1.0)
        await route.continue_()

    await page.route(lambda url: "/v1/images?" in url, slow)
    first = FilePayload(name="first.png", mimeType="image/png", buffer=strip_png(100, 30))
    await page.set_input_files("#file-input", files=[first])
    await expect(page.locator("#drop-zone")).to_have_attribute("aria-busy", "true")
    await expect(page.locator("#submit-job")).to_be_disabled()
    second = FilePayload(name="second.png", mimeType="image/png", buffer=strip_png(200, 50))
    await page.set_input_files("#file-input", files=[second])
    await expect(page.locator("#preview-caption")).to_contain_text(re.compile(r"^first\.png"))
    await page.wait_for_timeout(300)
    assert [url.rsplit("=", 1)[-1] for url in sent] == ["first.png"]
    await expect(page.locator("#submit-job")).to_be_enabled()
    await expect(page.locator("#drop-zone")).not_to_have_attribute("aria-busy", "true")


async def test_a_failed_upload_hides_its_progress_bar(page: Page) -> None:
    """A refused file's progress bar went on saying 100 % beside "Upload failed"."""
    await page.set_input_files(
        "#file-input", files=[FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"not a picture")]
    )
    await expect(page.locator("#upload-status")).to_have_text(re.compile("^Upload failed"))
    await expect(page.locator("#upload-progress")).to_be_hidden()


async def test_the_health_panel_says_when_the_gateway_does_not_answer(page: Page) -> None:
    """With the gateway unreachable the badge turns red (it kept the last answer's green), the last answer's
    rows go, and the panel says since when; "last answer at" tells how old the last good view was."""
    badge = page.locator("#health-status")
    await expect(badge).to_have_text("ok")
    checked = page.locator("#health-checked")
    await expect(checked).to_have_text(re.compile(r"^Checked at .+\.$"))
    await page.route("**/v1/health", lambda route: route.abort())
    await page.evaluate("loadHealth()")
    await expect(badge).to_have_text("unreachable")
    await expect(badge).to_have_class("badge status-failing")
    await expect(page.locator("#health tbody tr")).to_have_count(0)
    await expect(page.locator("#queue-depth")).to_have_text("Queue statistics unavailable.")
    await expect(checked).to_have_text(
        re.compile(r"^The gateway did not answer at .+\. Last answer at .+\.$")
    )


class OneKey:
    """The key store of a gateway with one API key, ``the-key``."""

    async def lookup(self, key: str) -> str | None:
        return "key-1" if key == "the-key" else None


async def test_the_queue_says_it_needs_an_api_key_instead_of_showing_no_jobs(
    browser: Browser, mesh: FakeMesh
) -> None:
    """With authentication on and no key, the queue says why it is empty (it was silently empty, as if
    there were no jobs), and the message goes once a key is entered."""
    app, ctx = build_gateway(mesh.gateway_settings(auth_mode="api_key"), OneKey())
    try:
        async with serve_app(app) as url:
            opened = await browser.new_page()
            opened.set_default_timeout(TIMEOUT_MS)
            try:
                await opened.goto(url + "/")
                status = opened.locator("#queue-status")
                await expect(status).to_have_text(
                    re.compile(
                        r"^Queue unavailable: UNAUTHENTICATED: .+\. Enter an API key under Credentials\.$"
                    )
                )
                await opened.click("details.credentials summary")
                await opened.fill("#api-key", "the-key")
                await opened.press("#api-key", "Enter")
                await expect(status).to_have_text("")
            finally:
                await opened.close()
    finally:
        await close_gateway(ctx)


def _contrast(first: tuple[int, ...], second: tuple[int, ...]) -> float:
    """WCAG's contrast ratio of two sRGB colours."""

    def luminance(rgb: tuple[int, ...]) -> float:
        channels = [c / 255 for c in rgb]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


async def test_the_focus_ring_stands_out_and_show_buttons_name_their_job(page: Page) -> None:
    """The focus ring has at least 3:1 against the white card (it had 2.05:1), and each Show button is named
    after its job, as Cancel and Retry are (a screen reader heard a list of "Show")."""
    await _upload(page)
    row = await _submit(page)
    await expect(page.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
    short = (await page.get_attribute(row, "data-job") or "")[:8]
    await expect(page.locator(f'{row} button[data-action="show"]')).to_have_attribute(
        "aria-label", f"Show result of job {short}"
    )
    await page.focus("#priority")
    await page.keyboard.press("Tab")
    ring = await page.evaluate(
        """() => {
            const element = document.activeElement;
            return [element.id, getComputedStyle(element).outlineStyle, getComputedStyle(element).outlineColor];
        }"""
    )
    assert ring[:2] == ["submit-job", "solid"]
    colour = tuple(int(c) for c in re.findall(r"\d+", ring[2])[:3])
    assert _contrast(colour, (255, 255, 255)) >= 3


async def test_the_pages_files_are_revalidated_on_every_use(client: httpx.AsyncClient) -> None:
    """The page's script and style say ``Cache-Control: no-cache``, with an ETag that makes an unchanged file a
    304: without it the browser reused them for days, so that a new release's page could run an old script."""
    for path in ("/static/app.js", "/static/style.css"):
        response = await client.get(path)
        assert response.headers["cache-control"] == "no-cache", path
        again = await client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304, path


async def test_the_page_and_the_docs_run_under_strict_content_security_policies(
    browser: Browser, mesh: FakeMesh
) -> None:
    """ "/" and /static send a strict policy (scripts, styles and requests from the gateway only; images also
    data: and blob:), where they sent only frame-ancestors: the API key lives in localStorage, where any
    injected script could read it. /docs allows its one inline script by hash. An upload, a filtered job's
    result (blob: pictures) and Swagger UI run without a violation."""
    app, ctx = build_gateway(mesh.gateway_settings())
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/static/app.js", "/static/style.css"):
                assert (await client.get(path)).headers["content-security-policy"] == PAGE_POLICY, path
            docs_policy = (await client.get("/docs")).headers["content-security-policy"]
            directives = dict(d.split(" ", 1) for d in docs_policy.split("; "))
            assert directives["default-src"] == "'self'"
            assert re.fullmatch(r"'self' 'sha256-[A-Za-z0-9+/]+=*'", directives["script-src"])
            assert directives["frame-ancestors"] == "'none'"
            opened = await browser.new_page()
            opened.set_default_timeout(TIMEOUT_MS)
            violations: list[str] = []
            opened.on(
                "console",
                lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
            )
            try:
                await opened.goto(url + "/")
                await _upload(opened)
                await opened.check("#filter-grayscale")
                row = await _submit(opened)
                await expect(opened.locator(row)).to_have_attribute("data-state", "SUCCEEDED")
                await expect(opened.locator("#strip-canvas")).to_have_attribute("data-lines", "2")
                await expect(opened.locator("#original-image")).to_have_js_property("complete", True)
                await opened.goto(url + "/docs")
                await expect(opened.locator(".opblock").first).to_be_visible()
                await opened.locator(".opblock-summary").first.click()
                await expect(opened.locator(".opblock-body").first).to_be_visible()
            finally:
                await opened.close()
    finally:
        await close_gateway(ctx)
    assert violations == []
