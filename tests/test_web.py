"""The web page of tide-cli serve in a real headless browser: the system's chromium driven by
playwright (playwright's own browser download is never used).

A question typed into the page is answered as the server streams it, the denoising canvas
fills step by step with the answer's tokens, the answer's figures appear, and Stop cancels a
running generation on the server. TIDE_WEB_SCREENSHOT=PATH saves the page after the first answer
(docs/serve-web.png was made this way)."""

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from serve_process import Server, request  # noqa: E402

ANSWER = "37 plus 48 is 85."


def _chromium():
    for name in (os.environ.get("TIDE_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install chromium; or set "
                             "TIDE_CHROMIUM to a Chromium/Chrome binary)")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 760})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_function("document.getElementById('model').textContent === 'tide-demo'")
    yield pg
    ctx.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def _watch_steps(pg):
    # every text the step line shows while the answer streams: proof the canvas moved live
    pg.evaluate("""() => {
        window.__steps = [];
        new MutationObserver(() => window.__steps.push(
            document.getElementById('stepinfo').textContent))
          .observe(document.getElementById('stepinfo'), {childList: true, characterData: true,
                                                          subtree: true});
    }""")


def _ask(pg, text):
    pg.fill("#prompt", text)
    pg.press("#prompt", "Enter")


def test_page_is_served_from_the_package(server):
    for path, kind in (("/", "text/html"), ("/web/app.js", "text/javascript"),
                       ("/web/style.css", "text/css")):
        status, body = request(server.url + path)
        assert status == 200 and isinstance(body, str) and body
    html = request(server.url + "/")[1]
    assert "http://" not in html and "https://" not in html   # nothing loaded from outside
    assert request(server.url + "/web/../app.py")[0] == 404


def test_conversation_and_live_canvas(page):
    page.click("#settings summary")
    page.fill("#threshold", "0.999")   # several denoising steps, so the canvas visibly moves
    _watch_steps(page)
    _ask(page, "What is 37 plus 48?")
    page.wait_for_selector(".msg.assistant .figures", timeout=60000)
    reply = page.inner_text(".msg.assistant .text")
    assert reply == ANSWER
    steps = page.evaluate("window.__steps")
    assert len(set(steps)) >= 2, steps
    # the canvas holds the answer, token by token (spaces shown as middle dots), then the EOS
    cells = page.eval_on_selector_all(
        "#canvas .cell", "cs => cs.map(c => [c.className, c.textContent])")
    shown = []
    for cls, text in cells:
        if "eos" in cls:
            break
        assert "mask" not in cls, "a mask left inside the answer"
        shown.append(text)
    assert "".join(shown).replace("\u00b7", " ") == ANSWER
    stats = page.inner_text("#stats")
    assert "tokens/s" in stats and "steps" in stats and "experts" in stats
    if os.environ.get("TIDE_WEB_SCREENSHOT"):
        page.screenshot(path=os.environ["TIDE_WEB_SCREENSHOT"])

    # the conversation goes on: the second question is sent with the first exchange
    _ask(page, "How many minutes are in 3 hours?")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .figures').length === 2",
                           timeout=60000)
    assert page.locator(".msg.user").count() == 2
    assert page.inner_text(".msg.assistant >> nth=1").strip() != ""


def test_canvas_draws_edits(page):
    """The page draws the step events' edits (LLaDA2.1's token-to-token editing), here fed
    to it directly: the engine's 2.0 schedule never edits."""
    page.evaluate("""() => {
        resetCanvas();
        drawStep({block: 0, step: 0, start: 0, end: 4, masked: 2, unmasked: [[0, "a"], [1, "b"]],
                  edited: [], eos: []});
        drawStep({block: 0, step: 1, start: 0, end: 4, masked: 2, unmasked: [],
                  edited: [[0, "c"], [1, null]], eos: []});
    }""")
    cells = page.eval_on_selector_all(
        "#canvas .cell", "cs => cs.map(c => [c.className, c.textContent])")
    assert cells[0] == ["cell tok edit", "c"]
    assert cells[1][0] == "cell mask" and cells[2][0] == "cell mask" and len(cells) == 4


def test_stop_cancels_on_the_server(browser):
    # one token a step over a 256-token block, not stopping at the end of text: seconds of work
    server = Server("--max-tokens", "240", "--block-length", "256", "--steps", "256",
                    "--threshold", "1", "--no-eos-early-stop")
    pg = browser.new_page()
    try:
        pg.goto(server.url + "/")
        pg.wait_for_function("document.getElementById('model').textContent === 'tide-demo'")
        pg.click("#settings summary")
        pg.fill("#max_tokens", "")   # the server's settings
        _ask(pg, "What is 37 plus 48?")
        pg.wait_for_function("document.getElementById('stepinfo').textContent !== ''",
                             timeout=60000)
        pg.click("#stop")
        pg.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        deadline = time.monotonic() + 30
        while request(server.url + "/health")[1]["queue"]["cancelled"] == 0:
            assert time.monotonic() < deadline, "the server did not cancel the stopped answer"
            time.sleep(0.05)
        assert request(server.url + "/health")[1]["queue"]["completed"] == 0
        assert not pg.is_disabled("#send")
    finally:
        pg.close()
        assert server.stop() == 0
