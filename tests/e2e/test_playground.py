"""The playground and the API docs in a real browser: Debian's chromium, driven by selenium through Debian's
chromedriver, against a real ``dynfuse serve``.

Nothing is downloaded: both binaries are the system's and Selenium Manager is never asked (a call fails the
test). The browser resolves no host name, so a page that needed a CDN would fail here as it does on a server
without internet. Every figure the page shows is checked against the API's own answer for the same input.
Screenshots at 1280x800 and 390x844 are written to tests/artifacts/ (or $DYNFUSE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from conftest import launch_server, require_tool, stop_servers

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("DYNFUSE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
WIDE, PHONE = (1280, 800), (390, 844)
WAIT_S = 20
KEY = "s3cret-playground"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--lang=en-US",
    # No name resolves: the server on 127.0.0.1 is reached, a CDN or a font host never is.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


# -- the browser and the servers, one of each per module ------------------------------------------
def _no_selenium_manager(*_args, **_kwargs):
    raise AssertionError("Selenium Manager was asked for a driver or a browser: it must never download one")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        driver.set_page_load_timeout(30)
        set_viewport(driver, *WIDE)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def servers(tiny_store):
    started = []
    yield lambda **env: launch_server(tiny_store, started, **env)[1]
    stop_servers(started)


@pytest.fixture(scope="module")
def base(servers) -> str:
    return servers()


@pytest.fixture(scope="module")
def explained_base(tiny_export):
    """A server over the tiny run this checkout exports: explain needs a model exported with attribution, which the
    shipped store/shapes/1 is not until it is re-shipped."""
    started = []
    yield launch_server(tiny_export, started)[1]
    stop_servers(started)


@pytest.fixture(autouse=True)
def no_script_errors(request):
    """No test leaves a JavaScript error in the console (a failed HTTP status is the page's business)."""
    if "browser" not in request.fixturenames:
        yield
        return
    driver = request.getfixturevalue("browser")
    driver.get_log("browser")  # drop what earlier tests left
    yield
    errors = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert errors == []


# -- helpers ---------------------------------------------------------------------------------------
def set_viewport(driver, width: int, height: int) -> None:
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def wait(driver, condition, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def select(driver, css: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_playground(driver, base: str) -> None:
    driver.get(f"{base}/")
    wait(driver, lambda d: select(d, "#route-select option"), "the page never read the model")


def fill(driver, image: Path | None, text: str) -> None:
    if image is not None:
        by_id(driver, "image-input").send_keys(str(image))  # the drop zone's real file input
    box = by_id(driver, "text-input")
    box.clear()
    box.send_keys(text)


def classify_on_page(driver) -> None:
    by_id(driver, "classify-button").click()
    wait(driver, lambda d: by_id(d, "out-label").text or by_id(d, "error").is_displayed(), "no answer shown")


def api_classify(base: str, image: bytes | None, text: str, key: str | None = None, **fields) -> httpx.Response:
    files = {"image": ("input.png", image, "image/png")} if image is not None else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/classify", files=files, data={"text": text, **fields}, headers=headers, timeout=30)


def percent(text: str) -> float:
    """'−4.0%' as the page writes it -> -4.0."""
    return float(text.replace("\u2212", "-").rstrip("%"))


def assert_percent(shown: str, ratio: float) -> None:
    assert abs(percent(shown) - 100 * ratio) <= 0.05 + 1e-9, (shown, ratio)


def write_pair(tmp_path: Path, sample: dict) -> Path:
    path = tmp_path / f"{sample['id']}.png"
    path.write_bytes(sample["png"])
    return path


def no_horizontal_overflow(driver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def screenshot(driver, name: str, *, full_page: bool) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if full_page:
        set_viewport(driver, width, driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(path))
    set_viewport(driver, width, height)
    print(f"screenshot: {path}")  # noqa: T201 - the artifact's path, for whoever reads the test log
    return path


# -- the page against the API ------------------------------------------------------------------------
def test_the_page_shows_what_the_api_answers_for_the_same_image_and_text(browser, base, samples, tmp_path):
    sample = samples[3]
    open_playground(browser, base)
    fill(browser, write_pair(tmp_path, sample), sample["text"])
    classify_on_page(browser)
    api = api_classify(base, sample["png"], sample["text"]).json()

    assert by_id(browser, "out-label").text == api["label"]
    assert_percent(by_id(browser, "out-confidence").text, max(api["scores"].values()))
    top = sorted(api["scores"], key=api["scores"].get, reverse=True)[:5]
    assert [row.get_attribute("data-name") for row in select(browser, "#out-scores li")] == top
    assert by_id(browser, "out-expert").text == api["route"]["expert"]
    assert by_id(browser, "out-decided-by").text == api["route"]["decided_by"]
    drawn_scores = {
        row.get_attribute("data-name"): float(row.get_attribute("data-value"))
        for row in select(browser, "#out-route-scores li")
    }
    assert drawn_scores == api["route"]["scores"]
    for modality in ("text", "image"):
        shown = by_id(browser, f"out-importance-{modality}")
        assert float(shown.get_attribute("data-value")) == api["importance"][modality]
        assert_percent(shown.text, api["importance"][modality])
        weight = by_id(browser, f"out-weight-{modality}")  # the routers' figure, in the route card
        assert float(weight.get_attribute("data-value")) == api["route"]["modality_weights"][modality]
    assert by_id(browser, "out-importance-method").text  # how the shares were computed, in words
    assert not by_id(browser, "explanation-block").is_displayed()  # exact values only on request
    assert by_id(browser, "out-madds").text == f"{api['compute']['madds']:,}"
    assert by_id(browser, "out-madds-full").text == f"{api['compute']['madds_full']:,}"
    assert_percent(by_id(browser, "out-saved").text, api["compute"]["saved_ratio"])
    assert all(by_id(browser, f"out-time-{t}").text.endswith(" ms") for t in ("queue", "inference", "total", "browser"))
    assert api["label"] in by_id(browser, "status").get_attribute("textContent")  # what a screen reader hears


def test_compare_runs_every_expert_and_marks_the_routers_choice(browser, base, samples, tmp_path):
    sample = samples[5]
    open_playground(browser, base)
    fill(browser, write_pair(tmp_path, sample), sample["text"])
    by_id(browser, "compare-button").click()
    experts = [e["name"] for e in httpx.get(f"{base}/v1/models/shapes", timeout=10).json()["experts"]]
    wait(browser, lambda d: len(select(d, "#compare-rows tr")) == len(experts), "the compare table never filled")
    auto = api_classify(base, sample["png"], sample["text"]).json()

    rows = select(browser, "#compare-rows tr")
    assert [row.get_attribute("data-expert") for row in rows] == experts
    for row in rows:
        forced = api_classify(base, sample["png"], sample["text"], route=row.get_attribute("data-expert")).json()
        cells = row.find_elements("css selector", "td")
        label, confidence, madds, saved, _, decided = (cell.text for cell in cells)
        assert label == forced["label"]
        for modality in ("text", "image"):  # each expert's own attribution of its answer
            assert float(cells[5].get_attribute(f"data-{modality}")) == forced["importance"][modality]
            assert f"{modality} " in decided
        assert_percent(confidence, max(forced["scores"].values()))
        assert madds == f"{forced['compute']['madds']:,}"
        assert_percent(saved, forced["compute"]["saved_ratio"])
    chosen = [row.get_attribute("data-expert") for row in rows if row.get_attribute("data-chosen") == "true"]
    assert chosen == [auto["route"]["expert"]]
    assert "router's choice" in select(browser, "#compare-rows tr.is-chosen th")[0].text
    assert f"The router chose {auto['route']['expert']}" in by_id(browser, "compare-summary").text


def test_explain_shows_the_exact_values_the_api_computes(browser, explained_base, samples, tmp_path):
    base, sample = explained_base, samples[7]
    open_playground(browser, base)
    fill(browser, write_pair(tmp_path, sample), sample["text"])
    select(browser, '#route-select option[value="mi2p"]')[0].click()  # reads both modalities
    by_id(browser, "explain-input").click()
    classify_on_page(browser)
    wait(browser, lambda d: by_id(d, "explanation-block").is_displayed(), "no exact values shown")
    api = api_classify(base, sample["png"], sample["text"], route="mi2p", explain="true").json()

    for modality in ("text", "image"):
        exact = by_id(browser, f"out-exact-{modality}")
        assert float(exact.get_attribute("data-value")) == api["explanation"]["importance"][modality]
        shapley = by_id(browser, f"out-shapley-{modality}")
        assert float(shapley.get_attribute("data-value")) == api["explanation"]["shapley"][modality]
        assert (
            float(by_id(browser, f"out-importance-{modality}").get_attribute("data-value"))
            == api["importance"][modality]
        )
    assert (
        f"{api['explanation']['log_prob']['neither']:+.3f}".replace("-", "\u2212")
        in by_id(browser, "out-log-probs").text
    )
    assert by_id(browser, "out-madds").text == f"{api['compute']['madds']:,}"  # the explanation's cost included


def test_compare_without_an_image_says_why_the_image_experts_cannot_run(browser, base, samples):
    open_playground(browser, base)
    fill(browser, None, samples[0]["text"])
    by_id(browser, "compare-button").click()
    wait(browser, lambda d: select(d, "#compare-rows tr"), "the compare table never filled")

    for row in select(browser, "#compare-rows tr"):
        expert = row.get_attribute("data-expert")
        answer = api_classify(base, None, samples[0]["text"], route=expert)
        cells = [cell.text for cell in row.find_elements("css selector", "td")]
        if answer.status_code == 200:
            assert cells[0] == answer.json()["label"]
        else:  # an expert that needs the image: the API's 422, in the row
            assert answer.status_code == 422
            assert cells == [f"422 {answer.json()['error']['message']}"]
    assert by_id(browser, "compare-rows").find_elements("css selector", "td.error-text")


def test_a_file_that_is_not_an_image_shows_the_apis_415_message(browser, base, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"these are notes, not pixels\n")
    open_playground(browser, base)
    fill(browser, notes, "a red circle")
    classify_on_page(browser)
    api = api_classify(base, notes.read_bytes(), "a red circle")

    assert api.status_code == 415
    assert by_id(browser, "error").is_displayed()
    assert by_id(browser, "error-status").text == "415 Unsupported Media Type"
    assert by_id(browser, "error-code").text == api.json()["error"]["code"]
    assert by_id(browser, "error-message").text == api.json()["error"]["message"]
    assert not by_id(browser, "result-cards").is_displayed()


def test_an_invalid_threshold_shows_the_apis_422_message(browser, base, samples):
    open_playground(browser, base)
    fill(browser, None, samples[0]["text"])
    by_id(browser, "threshold-input").send_keys("2")
    classify_on_page(browser)
    api = api_classify(base, None, samples[0]["text"], threshold="2")

    assert api.status_code == 422
    assert by_id(browser, "error-status").text.startswith("422")
    assert by_id(browser, "error-message").text == api.json()["error"]["message"]


def test_an_example_fills_the_form_in_one_click(browser, base):
    open_playground(browser, base)
    wait(browser, lambda d: select(d, "#examples .example img[src]"), "no example thumbnails")
    example = httpx.get(f"{base}/v1/models/shapes", timeout=10).json()["examples"][2]
    [button] = select(browser, f'#examples .example[data-id="{example["id"]}"]')
    button.click()
    wait(browser, lambda d: by_id(d, "text-input").get_attribute("value") == example["text"], "the text was not set")
    classify_on_page(browser)
    image = httpx.get(f"{base}{example['image_url']}", timeout=10).content
    api = api_classify(base, image, example["text"]).json()

    assert by_id(browser, "preview").is_displayed()
    assert by_id(browser, "out-label").text == api["label"]
    assert by_id(browser, "out-expert").text == api["route"]["expert"]
    assert by_id(browser, "out-madds").text == f"{api['compute']['madds']:,}"
    assert example["label"] in by_id(browser, "out-expected").text


def test_the_live_panel_shows_the_route_mix_and_compute_saved_from_the_servers_counters(browser, base, samples):
    open_playground(browser, base)
    wait(browser, lambda d: by_id(d, "live-status").get_attribute("data-updated"), "the counters were never read")
    assert by_id(browser, "live-requests").text == "0"  # the window starts when the page opens
    routes = ["text", "text", "late_fusion"]
    answers = [api_classify(base, samples[0]["png"], samples[0]["text"], route=r).json() for r in routes]
    by_id(browser, "live-refresh").click()
    wait(browser, lambda d: by_id(d, "live-requests").text == "3", "the panel never counted the requests")

    counts = {
        li.get_attribute("data-expert"): li.get_attribute("data-count") for li in select(browser, "#live-legend li")
    }
    experts = [e["name"] for e in httpx.get(f"{base}/v1/models/shapes", timeout=10).json()["experts"]]
    # Every expert (and soft fusion, which a request may ask for), the idle ones at 0.
    assert counts == dict.fromkeys([*experts, "soft"], "0") | {"text": "2", "late_fusion": "1"}
    saved = 1 - sum(a["compute"]["madds"] for a in answers) / sum(a["compute"]["madds_full"] for a in answers)
    assert float(by_id(browser, "live-saved").get_attribute("data-value")) == pytest.approx(saved, abs=1e-12)
    assert_percent(by_id(browser, "live-saved").text, saved)
    assert "request 3" in by_id(browser, "live-decided").text


def test_routes_operating_points_and_soft_weights_are_offered_and_shown(browser, base, samples):
    model = httpx.get(f"{base}/v1/models/shapes", timeout=10).json()
    experts = [e["name"] for e in model["experts"]]
    points = [p["name"] for p in model["operating_points"]]
    open_playground(browser, base)

    assert by_id(browser, "op-field").is_displayed()
    options = select(browser, "#op-select option")
    assert [o.get_attribute("value") for o in options] == points  # cheapest first, as the API lists them
    assert [o.get_attribute("value") for o in options if o.is_selected()] == [model["default_operating_point"]]
    assert [o.get_attribute("value") for o in select(browser, "#route-select option")] == ["auto", "soft", *experts]

    other = next(p for p in points if p != model["default_operating_point"])
    fill(browser, None, samples[0]["text"])
    select(browser, f'#op-select option[value="{other}"]')[0].click()
    select(browser, f'#route-select option[value="{experts[0]}"]')[0].click()
    assert not by_id(browser, "op-select").is_enabled()  # a forced expert: no router to pick
    select(browser, '#route-select option[value="soft"]')[0].click()
    assert by_id(browser, "op-select").is_enabled()
    assert not by_id(browser, "threshold-input").is_enabled()  # the threshold is the auto router's
    classify_on_page(browser)

    api = api_classify(base, None, samples[0]["text"], route="soft", operating_point=other).json()
    assert by_id(browser, "out-expert").text == api["route"]["expert"] == "soft"
    assert by_id(browser, "out-operating-point").text == f"Operating point: {other}"
    assert by_id(browser, "weights-block").is_displayed()
    weights = [row.get_attribute("data-name") for row in select(browser, "#out-route-weights li")]
    assert weights == experts


# -- keyboard, API key, docs, screenshots ------------------------------------------------------------
def test_every_control_is_labelled_and_the_keyboard_alone_runs_a_classification(browser, base, samples):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_playground(browser, base)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter((e) => e.labels.length === 0 && !e.getAttribute('aria-label')).map((e) => e.id)"
    )
    assert unlabelled == []

    def tab_to(element_id: str, seen: list) -> None:
        for _ in range(40):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            seen.append(browser.switch_to.active_element.get_attribute("id"))
            if seen[-1] == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}: {seen}")

    seen = []  # a freshly loaded page: nothing has focus, the first Tab goes to the first control
    tab_to("text-input", seen)
    assert "image-input" in seen  # the drop zone's file input is a tab stop too
    ActionChains(browser).send_keys(samples[1]["text"]).perform()
    tab_to("classify-button", seen)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait(browser, lambda d: by_id(d, "out-label").text, "Enter on Classify gave no answer")
    assert by_id(browser, "out-label").text == api_classify(base, None, samples[1]["text"]).json()["label"]


def test_with_an_api_key_the_page_asks_for_it_and_shows_the_401_message(browser, servers, samples):
    from selenium.webdriver.common.keys import Keys

    keyed = servers(api_key=KEY)
    browser.get(f"{keyed}/")
    wait(browser, lambda d: by_id(d, "key-form").is_displayed(), "no key field")
    assert select(browser, "#route-select option") == []

    by_id(browser, "key-input").send_keys("wrong", Keys.ENTER)
    wait(browser, lambda d: by_id(d, "key-error").text, "no message for a wrong key")
    refused = httpx.get(f"{keyed}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert refused.status_code == 401
    assert by_id(browser, "key-error").text == f"401 {refused.json()['error']['message']}"

    by_id(browser, "key-input").clear()
    by_id(browser, "key-input").send_keys(KEY, Keys.ENTER)
    wait(browser, lambda d: select(d, "#route-select option"), "the right key did not load the model")
    assert not by_id(browser, "key-form").is_displayed()
    fill(browser, None, samples[2]["text"])
    classify_on_page(browser)
    api = api_classify(keyed, None, samples[2]["text"], key=KEY).json()
    assert by_id(browser, "out-label").text == api["label"]
    assert KEY not in browser.current_url
    stored = browser.execute_script("return JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie])")
    assert KEY not in stored


@pytest.mark.parametrize(
    ("page", "operation"),
    [("/docs", ".opblock"), ("/redoc", "[data-section-id^='operation/']")],
)
def test_the_api_docs_render_their_operations_with_no_network(browser, base, page, operation):
    browser.get(f"{base}{page}")
    wait(browser, lambda d: len(select(d, operation)) > 0, f"{page} rendered no operation")
    wait(browser, lambda d: "Classify one image-text pair" in d.find_element("tag name", "body").text)

    summaries = [
        op["summary"]
        for path in httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"].values()
        for op in path.values()
    ]
    body = browser.find_element("tag name", "body").text
    assert [s for s in summaries if s not in body] == []
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert any(r.startswith(f"{base}/docs-assets/") for r in resources)
    # What a bundle asks of the internet (ReDoc's menu wants its CDN's logo), the page's policy refuses
    # before any request is made; the browser says so in the console, and nothing else goes wrong there.
    messages = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    refused = {url for m in messages for url in re.findall(r"'(https?://[^']+)' violates .* has been blocked", m)}
    assert {r for r in resources if not r.startswith(base)} <= refused
    assert [m for m in messages if "has been blocked" not in m] == []


def test_screenshots_at_desktop_and_phone_width(browser, base):
    open_playground(browser, base)
    wait(browser, lambda d: select(d, "#examples .example img[src]"), "no example thumbnails")
    select(browser, "#examples .example")[0].click()
    wait(browser, lambda d: by_id(d, "text-input").get_attribute("value"), "the example did not fill the form")
    classify_on_page(browser)
    by_id(browser, "compare-button").click()
    wait(browser, lambda d: select(d, "#compare-rows tr"), "no compare table")
    by_id(browser, "live-refresh").click()
    wait(browser, lambda d: by_id(d, "live-requests").text not in ("–", "0"))

    shots = []
    for (width, height), name in ((WIDE, "1280x800"), (PHONE, "390x844")):
        set_viewport(browser, width, height)
        assert no_horizontal_overflow(browser), f"the page is wider than a {name} window"
        shots.append(screenshot(browser, f"playground-{name}.png", full_page=False))
        shots.append(screenshot(browser, f"playground-{name}-full.png", full_page=True))
    set_viewport(browser, *WIDE)
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"\d", by_id(browser, "live-requests").text)
