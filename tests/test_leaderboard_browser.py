"""The leaderboard page in a real headless browser (Debian's Chromium, driven through chromedriver):
it renders, makes no network request, logs no console error, shows a defense name containing HTML
as text instead of running it, fits a 1280 px window, sorts, filters, collapses, links every row and
cell to the defense's detail, and still works in rank order with scripts off."""

from __future__ import annotations

import json

import pytest

from leaderboard.build import write_leaderboard
from leaderboard.screenshot import binaries, set_viewport, start
from tests.leaderboard_data import FakeDefense, write_database

EVIL = "<script>window.__pwned=1</script><img src=x onerror='window.__pwned=2'>evil-v1"
LONG = "a-defense-whose-registered-identifier-goes-on-and-on-without-a-single-space-v1"
"""Long enough that the summary cannot fit 1280 px without scrolling inside its box."""
WIDTH = 1280

pytestmark = pytest.mark.skipif(
    None in binaries(),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; CI installs them)",
)


def _page(root, defenses):
    db = write_database(root / "r.db", defenses)
    write_leaderboard(db, root / "out")
    return root / "out" / "index.html"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    defenses = [
        FakeDefense(
            "standard-v1",
            {("pgd-linf-v1", 0.1): 0.3, ("fgsm-linf-v1", 0.1): 0.35, ("pgd-linf-v1", 0.3): 0, ("pgd-l2-v1", 1.0): 0.1},
        ),
        FakeDefense(
            "pgd-at-linf-v1",
            {("pgd-linf-v1", 0.1): 0.8, ("fgsm-linf-v1", 0.1): 0.9, ("pgd-linf-v1", 0.3): 0.2, ("pgd-l2-v1", 1): 0.1},
            trained_against=[{"norm": "linf", "eps": 0.2, "attack": "pgd"}],
        ),
        FakeDefense("partial-v1", {("pgd-linf-v1", 0.1): 0.9, ("pgd-linf-v1", 0.3): 0.9}, failed=[("pgd-l2-v1", 1.0)]),
        FakeDefense(
            LONG,
            {("pgd-linf-v1", 0.1): 0.6, ("pgd-linf-v1", 0.3): 0.05, ("pgd-l2-v1", 1.0): 0.02},
            source="a-plugin-distribution-with-a-long-name==10.20.30",
        ),
        FakeDefense(  # an id is checked against its pattern before it is stored; a plugin's source is free text
            "evil-v1",
            {("pgd-linf-v1", 0.1): 0.5, ("pgd-linf-v1", 0.3): 0.4, ("pgd-l2-v1", 1.0): 0.3},
            observed={"randomized": True, "max_output_difference": 0.2},
            source=EVIL,
        ),
    ]
    path = _page(tmp_path_factory.mktemp("page"), defenses)
    report = json.loads((path.parent / "leaderboard.json").read_text())
    return path, [d.name for d in defenses], report


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start(tmp_path_factory.mktemp("chromium-profile"), logs=True)
    set_viewport(driver, WIDTH, 900)
    yield driver
    driver.quit()


@pytest.fixture
def loaded(browser, page):
    """The page freshly loaded (so a test's sorting or clicking does not leak into the next)."""
    path, names, report = page
    browser.get(path.as_uri())
    return browser, path, names, report


def _by(css):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _summary_names(browser) -> list[str]:
    rows = browser.find_elements(*_by("table.summary tbody tr"))
    return [row.find_element(*_by("td.nm a")).text for row in rows if row.is_displayed()]


def _scrolls_sideways(browser) -> bool:
    return browser.execute_script(
        "var d = document.documentElement; window.scrollTo(5000, window.scrollY);"
        "return d.scrollWidth > d.clientWidth || window.scrollX > 0;"
    )


def test_page_renders_every_defense(loaded):
    browser, _, names, _ = loaded
    assert browser.title == "robustmatrix leaderboard"
    assert len(browser.find_elements(*_by("table.summary tbody tr"))) == len(names)
    shown = browser.find_element(*_by("table.summary")).text
    for name in names:
        assert name in shown, name
    assert browser.find_elements(*_by("svg.generalization")) and browser.find_elements(*_by("svg.curves"))
    for img in browser.find_elements(*_by("img")):
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 0


def test_summary_columns_line_up_and_an_incomplete_defense_is_marked(loaded):
    """The two header rows (groups, then their columns) span exactly the cells of every body row."""
    browser, _, _, _ = loaded
    from selenium.webdriver.common.by import By

    table = browser.find_element(*_by("table.summary"))
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


def test_html_in_a_defense_source_is_text_not_code(loaded):
    browser, _, _, _ = loaded
    assert browser.execute_script("return window.__pwned === undefined")
    assert EVIL in browser.find_element(*_by("table.summary")).text


def test_at_1280_px_the_body_never_scrolls_sideways_the_tables_do(loaded):
    browser, _, _, _ = loaded
    assert browser.execute_script("return window.innerWidth") == WIDTH
    assert not _scrolls_sideways(browser)
    box = browser.execute_script("return document.querySelector('table.summary').parentElement")
    assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", box), (
        "the fixture's summary is wider than the window, so this test shows it scrolls inside its box"
    )
    name = browser.find_element(*_by("table.summary tbody tr td.nm"))
    before = name.rect["x"]
    browser.execute_script("arguments[0].scrollLeft = 5000", box)
    assert browser.execute_script("return arguments[0].scrollLeft", box) > 0
    assert name.rect["x"] == pytest.approx(before, abs=1), "the defense column is sticky"
    assert not _scrolls_sideways(browser)


def test_clicking_a_column_header_reorders_rows(loaded):
    browser, _, _, report = loaded
    defenses = report["datasets"][0]["defenses"]
    assert _summary_names(browser) == [d["defense"] for d in defenses], "rank order first"
    unseen = browser.find_element(*_by('table.summary th[data-col="8"] button.sort'))
    by_unseen = sorted(defenses, key=lambda d: -d["unseen_worst_case"])
    assert [d["defense"] for d in by_unseen] != [d["defense"] for d in defenses], "the fixture must reorder"
    unseen.click()
    assert _summary_names(browser) == [d["defense"] for d in by_unseen]
    unseen.click()
    assert _summary_names(browser) == [d["defense"] for d in reversed(by_unseen)]
    browser.find_element(*_by('table.summary th[data-col="0"] button.sort')).click()
    assert _summary_names(browser) == [d["defense"] for d in defenses], "rank again, unranked last"


def test_the_filter_box_hides_rows_that_do_not_match(loaded):
    browser, _, _, _ = loaded
    box = browser.find_element(*_by(".tools input"))
    assert box.is_displayed()
    box.send_keys("linf")
    assert _summary_names(browser) == ["pgd-at-linf-v1"]
    matrix_rows = [r for r in browser.find_elements(*_by("table.matrix tbody tr")) if r.is_displayed()]
    assert len(matrix_rows) == 1
    assert "1 of 5" in browser.find_element(*_by(".tools .count")).text


def test_the_generalization_figure_is_first_with_a_row_per_defense_by_rank(loaded):
    browser, _, _, report = loaded
    data = report["datasets"][0]
    (figure,) = browser.find_elements(*_by("section figure.answer"))
    first = browser.execute_script("return document.querySelector('section h3, section figure.answer').tagName")
    assert first == "FIGURE", "the answer comes before the tables"
    rows = figure.find_elements(*_by("svg.generalization g.row"))
    assert len(rows) == len(data["defenses"])
    titles = [browser.execute_script("return arguments[0].querySelector('title').textContent", r) for r in rows]
    for entry, title, row in zip(data["defenses"], titles, rows, strict=True):
        assert entry["defense"] in title
        assert ("flagged" in row.get_attribute("class")) == bool(entry["flags"]), "masked defenses are marked"
    trained = next(d for d in data["defenses"] if d["defense"] == "pgd-at-linf-v1")
    sentence = figure.find_element(*_by(".verdict")).text
    assert f"{trained['seen_worst_case']:.2f} on Linf but {trained['unseen_worst_case']:.2f} elsewhere" in sentence


def test_matrix_cells_carry_value_and_interval_seen_cells_are_framed_and_link_to_the_detail(loaded):
    browser, _, _, _ = loaded
    cells = browser.find_elements(*_by("table.matrix tbody td:not(.missing)"))
    assert cells and all("95% CI" in c.get_attribute("title") for c in cells)
    seen = browser.find_elements(*_by("table.matrix tbody td.seen"))
    assert seen and all("pgd-at-linf-v1" in c.get_attribute("title") for c in seen)
    assert browser.execute_script("return getComputedStyle(arguments[0]).boxShadow", seen[0]) != "none"
    for link in browser.find_elements(*_by("table.matrix tbody a, table.summary tbody td.nm a")):
        target = link.get_attribute("href").split("#", 1)[1]
        assert browser.execute_script("return document.getElementById(arguments[0]).tagName", target) == "DETAILS"
    seen[0].find_element(*_by("a")).click()
    detail = browser.find_element(*_by("details.defense[open]"))
    assert "pgd-at-linf-v1" in detail.find_element(*_by("summary")).text
    assert "Broken by" in detail.text and detail.find_elements(*_by("svg.curves"))


def test_a_threat_model_group_collapses_and_opens(loaded):
    browser, _, _, _ = loaded
    head = browser.find_element(*_by("table.matrix th.group[data-g='0']"))
    attacks = browser.find_elements(*_by("table.matrix td.g0"))
    assert attacks and all(c.is_displayed() for c in attacks), "a small matrix starts open"
    head.find_element(*_by("button")).click()
    assert not any(c.is_displayed() for c in attacks)
    assert head.get_attribute("colspan") == "1"
    head.find_element(*_by("button")).click()
    assert all(c.is_displayed() for c in attacks)


def test_a_flag_badge_shows_its_evidence_and_leads_to_the_detail(loaded):
    browser, _, _, report = loaded
    entry = next(d for d in report["datasets"][0]["defenses"] if d["flags"])
    badge = browser.find_element(*_by("table.summary a.flag"))
    assert entry["flags"][0]["evidence"] in badge.get_attribute("title")
    badge.click()
    detail = browser.find_element(*_by("details.defense[open]"))
    assert entry["flags"][0]["evidence"] in detail.text


def test_hovering_a_curve_names_it(loaded):
    browser, _, _, _ = loaded
    from selenium.webdriver.common.action_chains import ActionChains

    line = browser.find_element(*_by("section > .multiples svg.curves g.line"))
    name = browser.execute_script("return arguments[0].querySelector('title').textContent", line)
    label = line.find_element(*_by("text.label"))
    assert not label.is_displayed()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", line)
    marker = line.find_element(*_by("circle, rect, polygon"))
    ActionChains(browser).move_to_element(marker).perform()
    assert label.is_displayed() and label.text in name


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
    browser, path, _, _ = loaded
    assert _foreign_requests(browser, path.as_uri()) == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_the_request_check_sees_an_external_resource(browser, tmp_path):
    """The control for the test above: a page that loads an image from the network is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!doctype html><title>leaky</title><img src="http://192.0.2.1/pixel.png">')
    browser.get(page.as_uri())
    assert "http://192.0.2.1/pixel.png" in _foreign_requests(browser, page.as_uri())


WIDE = {f"attack{i}-{norm}-v1": ("gradient", 20, norm) for norm in ("linf", "l2") for i in range(12)}
WIDE_EPS = {"linf": (0.1, 0.2, 0.3), "l2": (0.5, 1.0)}


def _wide_cells(level: float) -> dict[tuple[str, float], float]:
    return {
        (attack, eps): max(0.0, level - 0.1 * k - 0.01 * i)
        for i, (attack, (_, _, norm)) in enumerate(WIDE.items())
        for k, eps in enumerate(WIDE_EPS[norm])
    }


@pytest.fixture(scope="module")
def two_sections(tmp_path_factory):
    """Two evaluation sizes, so two sections, each with its own answer; 60 attack columns, far wider
    than the window."""
    defenses = [
        FakeDefense("a-v1", _wide_cells(0.5)),
        FakeDefense("b-v1", _wide_cells(0.8), trained_against=[{"norm": "linf", "eps": 0.2, "attack": "pgd"}]),
        FakeDefense("new-v1", _wide_cells(0.6), n_eval=50),
    ]
    root = tmp_path_factory.mktemp("two")
    write_leaderboard(write_database(root / "r.db", defenses, attacks=WIDE), root / "out")
    return root / "out" / "index.html"


def test_the_generalization_figure_is_present_per_dataset(browser, two_sections):
    browser.get(two_sections.as_uri())
    sections = browser.find_elements(*_by("section[id^='dataset-']"))
    assert len(sections) == 2
    for section in sections:
        (figure,) = section.find_elements(*_by("figure.answer"))
        rows = figure.find_elements(*_by("svg.generalization g.row"))
        assert len(rows) == len(section.find_elements(*_by("table.summary tbody tr")))
        assert figure.find_element(*_by(".verdict")).text.startswith("Does robustness generalize?")
    assert not _scrolls_sideways(browser)
    assert not any(c.is_displayed() for c in browser.find_elements(*_by("table.matrix td.g0"))), (
        "a matrix wider than the window starts with its groups collapsed to their worst case"
    )


@pytest.fixture(scope="module")
def no_scripts(tmp_path_factory):
    driver = start(tmp_path_factory.mktemp("chromium-noscript"), scripts=False)
    set_viewport(driver, WIDTH, 900)
    yield driver
    driver.quit()


def test_with_scripts_off_the_page_is_complete_in_rank_order(no_scripts, page):
    path, _, report = page
    no_scripts.get(path.as_uri())
    assert not no_scripts.find_elements(*_by("html.js")), "scripts really are off"
    assert _summary_names(no_scripts) == [d["defense"] for d in report["datasets"][0]["defenses"]]
    assert not no_scripts.find_element(*_by(".tools")).is_displayed(), "no filter box that would do nothing"
    assert all(c.is_displayed() for c in no_scripts.find_elements(*_by("table.matrix td")))
    assert no_scripts.find_elements(*_by("svg.generalization g.row"))
    assert not _scrolls_sideways(no_scripts)


def test_with_scripts_off_a_wide_matrix_shows_every_column_inside_its_box(no_scripts, two_sections):
    no_scripts.get(two_sections.as_uri())
    matrix = no_scripts.find_element(*_by("table.matrix"))
    cells = matrix.find_elements(*_by("tbody tr:first-child td"))
    assert len(cells) == 60 + 5 and all(c.is_displayed() for c in cells), "every attack and every worst case"
    box = no_scripts.execute_script("return document.querySelector('table.matrix').parentElement")
    assert no_scripts.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth + 200", box)
    assert not _scrolls_sideways(no_scripts)
