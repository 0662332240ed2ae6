"""The leaderboard page in a real headless browser (Debian's Chromium, driven through chromedriver):
it renders, shows every defense, makes no network request, logs no console error, and shows a
defense name containing HTML as text instead of running it."""

from __future__ import annotations

import json
import shutil

import pytest

from leaderboard.build import write_leaderboard
from tests.leaderboard_data import FakeDefense, write_database

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EVIL = "<script>window.__pwned=1</script><img src=x onerror='window.__pwned=2'>evil-v1"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; CI installs them)",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    defenses = [
        FakeDefense("standard-v1", {("pgd-linf-v1", 0.1): 0.3, ("pgd-linf-v1", 0.3): 0.0, ("pgd-l2-v1", 1.0): 0.1}),
        FakeDefense(
            "pgd-at-linf-v1",
            {("pgd-linf-v1", 0.1): 0.8, ("pgd-linf-v1", 0.3): 0.2, ("pgd-l2-v1", 1.0): 0.1},
            trained_against=[{"norm": "linf", "eps": 0.2, "attack": "pgd"}],
        ),
        FakeDefense("partial-v1", {("pgd-linf-v1", 0.1): 0.9, ("pgd-linf-v1", 0.3): 0.9}, failed=[("pgd-l2-v1", 1.0)]),
        FakeDefense(
            EVIL,
            {("pgd-linf-v1", 0.1): 0.5, ("pgd-linf-v1", 0.3): 0.4, ("pgd-l2-v1", 1.0): 0.3},
            observed={"randomized": True, "max_output_difference": 0.2},
        ),
    ]
    db = write_database(root / "r.db", defenses)
    write_leaderboard(db, root / "out")
    return root / "out" / "index.html", [d.name for d in defenses]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def loaded(browser, page):
    path, names = page
    browser.get(path.as_uri())
    return browser, path, names


def test_page_renders_every_defense(loaded):
    browser, _, names = loaded
    from selenium.webdriver.common.by import By

    assert browser.title == "robustmatrix leaderboard"
    rows = browser.find_elements(By.CSS_SELECTOR, "table.summary tbody tr")
    assert len(rows) == len(names)
    shown = browser.find_element(By.CSS_SELECTOR, "table.summary").text
    for name in names:
        assert name in shown, name
    images = browser.find_elements(By.TAG_NAME, "img")
    assert images and all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)


def test_summary_columns_line_up_and_an_incomplete_defense_is_marked(loaded):
    """The two header rows (groups, then their columns) span exactly the cells of every body row."""
    browser, _, _ = loaded
    from selenium.webdriver.common.by import By

    table = browser.find_element(By.CSS_SELECTOR, "table.summary")
    header = table.find_elements(By.CSS_SELECTOR, "thead tr")
    assert len(header) == 2
    top = sum(int(th.get_attribute("colspan") or 1) for th in header[0].find_elements(By.TAG_NAME, "th"))
    grouped = sum(int(th.get_attribute("colspan") or 1) > 1 for th in header[0].find_elements(By.TAG_NAME, "th"))
    assert grouped and len(header[1].find_elements(By.TAG_NAME, "th")) == 8
    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        assert len(row.find_elements(By.TAG_NAME, "td")) == top
    (last,) = table.find_elements(By.CSS_SELECTOR, "tbody tr.unranked")
    assert last.text.startswith("– partial-v1") and "incomplete" in last.text
    badge = last.find_element(By.CSS_SELECTOR, ".incomplete")
    assert badge.is_displayed() and badge.get_attribute("title") == "not ranked: no result at l2 1"


def test_html_in_a_defense_name_is_text_not_code(loaded):
    browser, _, _ = loaded
    assert browser.execute_script("return window.__pwned === undefined")
    from selenium.webdriver.common.by import By

    assert EVIL in browser.find_element(By.CSS_SELECTOR, "table.summary").text


def _foreign_requests(browser, uri: str) -> list[str]:
    """Requests made by the page at ``uri`` for anything but itself and inline data, plus any
    request at all that went to the network. The browser's own start page loads chrome://
    resources; those are not the page's."""
    page_requests, network = [], []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if message["params"].get("documentURL") == uri:
                page_requests.append(url)
            if url.split(":", 1)[0] in {"http", "https", "ws", "wss", "ftp"}:
                network.append(url)
    assert uri in page_requests, "the performance log did not see the page load"
    return [url for url in page_requests if not (url.startswith("data:") or url == uri)] + network


def test_no_network_request_and_no_console_error(loaded):
    browser, path, _ = loaded
    assert _foreign_requests(browser, path.as_uri()) == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_the_request_check_sees_an_external_resource(browser, tmp_path):
    """The control for the test above: a page that loads an image from the network is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!doctype html><title>leaky</title><img src="http://192.0.2.1/pixel.png">')
    browser.get(page.as_uri())
    assert "http://192.0.2.1/pixel.png" in _foreign_requests(browser, page.as_uri())
