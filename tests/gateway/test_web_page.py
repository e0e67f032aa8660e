"""The web page in real headless Chromium (Debian's, driven by Playwright) against the fake services.

Skips locally when /usr/bin/chromium is missing; under CI=true that is a failure (``apt-get install chromium``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, FilePayload, Page, Request, async_playwright, expect

from mesh.inference.v1 import inference_service_pb2 as inference_pb
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
                assert headers["content-security-policy"] == "frame-ancestors 'none'", path
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
