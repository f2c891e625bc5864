"""The monitoring page of `emojax serve` in a real headless browser: the system's Chromium driven by Playwright
(executable_path; Playwright downloads nothing), over a FakeEngine (tests/serve_fakes.py) served by uvicorn."""

from __future__ import annotations

import pytest
from serve_fakes import NAMES, FakeEngine, live_server

from emojax.serve import ServeConfig, create_app
from emojax.tokenizer import ByteTokenizer

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser(require_system):
    chromium = require_system("chromium", "chromium-browser", package="chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _page(browser, url):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: errors.append(f"off-host request {r.url}") if not r.url.startswith(url) else None)
    page.goto(url + "/")
    return page, errors


def test_the_page_streams_a_generation_with_its_heatmap_chart_and_alerts(browser):
    engine = FakeEngine(delay_s=0.05)
    app = create_app(engine, ByteTokenizer(), ServeConfig(rules=("desperate>2:2 critical",)))
    with live_server(app) as url:
        page, errors = _page(browser, url)
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)
        checked = page.eval_on_selector_all("#concepts input:checked", "els => els.map(e => e.value)")
        assert "desperate" in checked and len(checked) == 2  # a concept a rule watches is shown first
        page.fill("#max_tokens", "12")
        page.fill("#prompt", "I feel desperate today")
        page.click("#send")
        # tokens show while the reply is still streaming
        page.wait_for_function("document.querySelectorAll('#conversation .tok').length > 0 "
                               "&& document.body.dataset.state === 'streaming'", timeout=20_000)
        page.wait_for_selector("#alerts li.alert[data-concept=desperate]", timeout=20_000)
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)

        request = engine.requests[-1]
        assert request.max_new_tokens == 12 and request.steering == ()
        tokens = page.locator("#conversation .msg.assistant .tok")
        assert tokens.count() == 12
        heat = page.eval_on_selector_all("#conversation .msg.assistant .tok", """els => els.map(e => ({
            value: Number(e.dataset.value), cells: e.querySelectorAll('.cells b').length,
            colour: getComputedStyle(e.firstChild).backgroundColor}))""")
        assert all(h["cells"] == 2 for h in heat)
        assert heat[-1]["value"] > 5 and heat[-1]["colour"].startswith("rgba(220, 38, 38")  # desperate, red
        alert = page.locator("#alerts li.alert").first
        assert alert.get_attribute("data-severity") == "critical" and "desperate" in alert.inner_text()
        chart = page.locator("#chart")
        assert chart.get_attribute("data-points") == "12"
        assert chart.get_attribute("data-series").split(",")[0] == "desperate"
        assert page.locator("#legend span").count() == 5

        # a steering slider reaches the next request
        page.select_option("#steer-concept", "calm")
        page.click("#steer-add")
        page.eval_on_selector("#sliders .slider[data-concept=calm] input", """el => {
            el.value = 0.25; el.dispatchEvent(new Event('input', {bubbles: true})); }""")
        page.fill("#prompt", "and now?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('#conversation .msg.assistant').length === 2 "
                               "&& document.body.dataset.state === 'ready'", timeout=20_000)
        request = engine.requests[-1]
        assert request.steering == (("calm", 0.25),)
        assert [m for m in page.eval_on_selector_all(".msg .who", "els => els.map(e => e.textContent)")] == \
            ["user", "assistant", "user", "assistant"]
        # the conversation so far went back with the second message
        assert b"Human: I feel desperate today" in bytes(request.prompt_ids[1:])
        assert errors == [], errors


def test_the_page_asks_for_the_api_key(browser):
    app = create_app(FakeEngine(), ByteTokenizer(), ServeConfig(api_key="k3y"))
    with live_server(app) as url:
        page, errors = _page(browser, url)
        page.wait_for_selector("body[data-state=error]", timeout=20_000)
        assert "API key" in page.inner_text("#status")
        page.fill("#key", "k3y")
        page.dispatch_event("#key", "change")
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)
        assert page.locator("#concepts input").count() == len(NAMES)
        assert [e for e in errors if "401" not in e] == []  # the first /v1/models answered 401, as it should
