"""The page and the CSV as files (no browser): every string escaped in every context, nothing loaded
from outside, the answer's sentence from the data, distinct drawing styles, CSV numbers rounded, and
a default-sized matrix's page under 3 MB."""

from __future__ import annotations

import csv
import re
from html.parser import HTMLParser

import numpy as np

from leaderboard.answer import sentence
from leaderboard.build import write_leaderboard
from leaderboard.families import styles
from tests.leaderboard_data import FakeDefense, write_database

EVIL = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>evil-v1"
LINF = [{"norm": "linf", "eps": 0.2, "attack": "pgd"}]
L2 = [{"norm": "l2", "eps": 1.0, "attack": "pgd"}]


class _Resources(HTMLParser):
    """Every tag, and every attribute that makes a browser fetch something."""

    FETCHING = {"src", "srcset", "poster", "data", "xlink:href", "action", "formaction", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.fetches: list[str] = []
        self.links: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in self.FETCHING or (tag == "link" and name == "href"):
                self.fetches.append(value or "")
            elif name == "href":
                self.links.append((tag, value or ""))


def _write(tmp_path, defenses, **kwargs):
    db = write_database(tmp_path / "r.db", defenses, **kwargs)
    write_leaderboard(db, tmp_path / "out")
    return tmp_path / "out"


def test_every_string_is_escaped_and_nothing_is_loaded_from_outside(tmp_path):
    out = _write(
        tmp_path,
        [
            # ids are checked against their pattern before they are stored; a plugin's source is free text
            FakeDefense("evil-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-l2-v1", 1.0): 0.2}, source=EVIL + 'x"><script>'),
            FakeDefense("pgd-at-linf-v1", {("pgd-linf-v1", 0.2): 0.7, ("pgd-l2-v1", 1.0): 0.1}, trained_against=LINF),
        ],
    )
    html = (out / "index.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and '"><script>' not in html
    assert html.count("<script") == 1, "only the page's own inline script"
    parsed = _Resources()
    parsed.feed(html)
    assert "img" not in parsed.tags or all(src.startswith("data:") for src in parsed.fetches)
    assert all(src.startswith("data:") for src in parsed.fetches), parsed.fetches
    external = [href for _, href in parsed.links if not (href.startswith("#") or re.fullmatch(r"[\w.-]+\.png", href))]
    assert external == [], "links go to anchors on the page or to the PNG beside it"
    assert "http://" not in html and "https://" not in html and "@import" not in html and "url(" not in html
    anchors = set(re.findall(r'\bid="([^"]+)"', html))
    assert all(href[1:] in anchors for _, href in parsed.links if href.startswith("#")), "no dead anchor"


def _entry(name, seen, unseen, trained=(), flags=(), rank=1):
    return {
        "defense": name,
        "rank": rank,
        "seen_worst_case": seen,
        "unseen_worst_case": unseen,
        "trained_against": list(trained),
        "flags": [{"key": key} for key in flags],
    }


def test_the_sentence_states_seen_and_unseen_per_family_from_the_data():
    defenses = [
        _entry("at-linf-a-v1", 0.7, 0.3, LINF),
        _entry("at-linf-b-v1", 0.5, 0.3, LINF),
        _entry("at-l2-v1", 0.6, 0.2, L2),
        _entry("standard-v1", None, 0.05),
        _entry("jpeg-v1", None, 0.4, flags=["zero-gradients"]),
        _entry("partial-v1", None, 0.9, rank=None),
    ]
    text = sentence(defenses, styles(defenses))
    assert text.startswith("Linf-trained defenses (2) keep 0.60 on Linf but 0.30 elsewhere; ")
    assert "; the L2-trained defense keeps 0.60 on L2 but 0.20 elsewhere; " in text
    assert "; the untrained defense keeps 0.05; " in text
    assert text.endswith(
        "the masking-flagged defense, trained for none of these threat models, keeps 0.40, and its "
        "flags say even that may be overstated."
    )
    assert "0.90" not in text, "an unranked defense averages fewer threat models: left out"


def test_no_two_defenses_are_drawn_alike(tmp_path):
    defenses = [
        {"defense": f"d{i}-v1", "flags": [], "trained_against": LINF if i % 2 else []} for i in range(2 * 7 + 3)
    ]
    drawn = styles(defenses)
    looks = {(s.colour, s.marker, s.dash, s.hollow) for s in drawn.values()}
    assert len(looks) == len(defenses)
    assert {s.family for s in drawn.values()} == {"linf-trained", "untrained"}
    assert len({(s.marker, s.dash) for s in drawn.values()}) == 2, "marker and line style per family"


def test_csv_numbers_are_rounded_to_four_decimals(tmp_path):
    out = _write(
        tmp_path,
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.1): 1 / 3, ("pgd-linf-v1", 0.3): 0.2, ("pgd-l2-v1", 1.0): 0.1}),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.1): 0.7, ("pgd-linf-v1", 0.3): 0.1, ("pgd-l2-v1", 1.0): 0.3}),
        ],
        n=300,
    )
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    numbers = [v for row in rows for v in row.values() if re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", v)]
    assert numbers and all(re.fullmatch(r"-?\d+\.\d{1,4}", v) for v in numbers), numbers
    assert rows[0]["pgd-linf-v1 linf 0.1"] in {"0.3333", "0.7"}
    assert "0.3333" in {rows[0]["pgd-linf-v1 linf 0.1"], rows[1]["pgd-linf-v1 linf 0.1"]}


def test_the_page_of_a_default_sized_matrix_is_under_3_mb(tmp_path):
    """The default run's shape: 16 defenses, 12 threat models (four norms, three eps each), five
    attacks per threat model, 250 evaluation examples."""
    eps = {"linf": (0.1, 0.2, 0.3), "l2": (0.75, 1.0, 1.5), "l1": (1.0, 2.0, 4.0), "spatial": (10.0, 20.0, 30.0)}
    attacks = {f"attack{i}-{norm}-v1": ("gradient", 20, norm) for norm in eps for i in range(5)}
    rng = np.random.default_rng(0)
    trained = [LINF, L2, []]
    defenses = [
        FakeDefense(
            f"a-default-sized-defense-{k}-v1",
            {(a, e): float(rng.uniform(0, 0.9)) for a, (_, _, norm) in attacks.items() for e in eps[norm]},
            trained_against=trained[k % 3],
        )
        for k in range(16)
    ]
    out = _write(tmp_path, defenses, n=250, attacks=attacks)
    size = (out / "index.html").stat().st_size
    assert size < 3_000_000, f"{size / 1e6:.2f} MB"
