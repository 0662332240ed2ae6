"""The leaderboard from synthetic databases with chosen outcomes: per-example worst case, seen vs
unseen, competitive ratio, every masking flag with its evidence, ranking, and the written files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bench.errors import RobustMatrixError
from leaderboard.build import write_leaderboard
from leaderboard.metrics import is_seen, wilson_interval
from leaderboard.report import ReportError, build_report, validate
from tests.leaderboard_data import FakeDefense, write_database

LINF_02 = [{"norm": "linf", "eps": 0.2, "attack": "pgd"}]


def _entry(report, name):
    (entry,) = [d for d in report["datasets"][0]["defenses"] if d["defense"] == name]
    return entry


def _flags(entry):
    return {f["key"]: f["evidence"] for f in entry["flags"]}


def test_wilson_interval_matches_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 100) == pytest.approx((0.7222, 0.8749), abs=1e-4)
    low, high = wilson_interval(90, 100)
    assert low < 0.9 < high and high - low < 0.13


def test_worst_case_is_per_example_not_the_minimum_of_means(tmp_path):
    first = np.zeros(100, dtype=bool)
    first[:50] = True
    db = write_database(
        tmp_path / "r.db",
        [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): first, ("fgsm-linf-v1", 0.2): ~first})],
    )
    entry = _entry(build_report(db), "d-v1")
    (threat,) = entry["worst_case_by_threat"]
    assert threat["value"] == 0.0, "each half survives one attack: no example survives both"
    assert entry["worst_case"] == 0.0


def test_seen_and_unseen_cells():
    assert is_seen("gradient", "linf", 0.1, LINF_02) and is_seen("adaptive", "linf", 0.2, LINF_02)
    assert not is_seen("gradient", "linf", 0.3, LINF_02), "larger eps than trained"
    assert not is_seen("gradient", "l2", 0.5, LINF_02), "another norm"
    for family in ("score-based", "decision-based", "transfer", "noise"):
        assert not is_seen(family, "linf", 0.1, LINF_02), family


def test_generalization_summary_and_competitive_ratio(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("linf-at-v1", {("pgd-linf-v1", 0.2): 0.6, ("pgd-l2-v1", 1.5): 0.1}, trained_against=LINF_02),
            FakeDefense(
                "l2-at-v1",
                {("pgd-linf-v1", 0.2): 0.3, ("pgd-l2-v1", 1.5): 0.4},
                trained_against=[{"norm": "l2", "eps": 1.5, "attack": "pgd"}],
            ),
        ],
    )
    report = build_report(db)
    linf = _entry(report, "linf-at-v1")
    assert linf["seen"] == pytest.approx(0.6) and linf["unseen"] == pytest.approx(0.1)
    assert linf["gap"] == pytest.approx(0.5) and linf["ratio"] == pytest.approx(0.1 / 0.6)
    cells = {c["attack"]: c for c in linf["cells"]}
    assert cells["pgd-linf-v1"]["seen"] and not cells["pgd-l2-v1"]["seen"]
    assert cells["pgd-linf-v1"]["relative"] == pytest.approx(1.0)
    assert cells["pgd-l2-v1"]["relative"] == pytest.approx(0.25)
    threats = {t["norm"]: t for t in linf["worst_case_by_threat"]}
    assert threats["linf"]["seen"] and not threats["l2"]["seen"]
    assert threats["l2"]["relative"] == pytest.approx(0.25)
    assert linf["relative_unseen_worst"] == pytest.approx(0.25)
    l2 = _entry(report, "l2-at-v1")
    assert l2["relative_seen_avg"] == pytest.approx(1.0) and l2["relative_unseen_avg"] == pytest.approx(0.5)


def test_competitive_ratio_is_taken_on_the_worst_case_not_on_attacks_a_masked_defense_fools(tmp_path):
    """A masked defense tops the plain-PGD column; its worst case (BPDA) does not. The ratio of an
    honest defense must not be dragged down by the masked one's inflated PGD number."""
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("honest-v1", {("pgd-linf-v1", 0.2): 0.5}, trained_against=LINF_02),
            FakeDefense("masked-v1", {("pgd-linf-v1", 0.2): 0.95, ("bpda-pgd-linf-v1", 0.2): 0.02}),
        ],
    )
    report = build_report(db)
    honest = _entry(report, "honest-v1")
    assert {c["attack"]: c["relative"] for c in honest["cells"]}["pgd-linf-v1"] == pytest.approx(0.5 / 0.95)
    assert honest["relative_seen_avg"] == pytest.approx(1.0)
    assert _entry(report, "masked-v1")["relative_unseen_avg"] == pytest.approx(0.02 / 0.5)


def test_rank_uses_the_adaptive_worst_case_never_a_weaker_attack(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("masked-v1", {("pgd-linf-v1", 0.2): 0.9, ("bpda-pgd-linf-v1", 0.2): 0.05}),
            FakeDefense("honest-v1", {("pgd-linf-v1", 0.2): 0.4}),
        ],
    )
    report = build_report(db)
    ranks = {d["defense"]: d["rank"] for d in report["datasets"][0]["defenses"]}
    assert ranks == {"honest-v1": 1, "masked-v1": 2}
    masked = _entry(report, "masked-v1")
    assert masked["worst_case"] == pytest.approx(0.05) and masked["strongest_attack"] == "bpda-pgd-linf-v1"
    assert "bpda-pgd-linf-v1 5.0% vs pgd-linf-v1 90.0% at linf 0.2" in _flags(masked)["standard-evaluation-unreliable"]


FLAG_CASES = [
    (
        "single-step-beats-iterative",
        {("fgsm-linf-v1", 0.2): 0.1, ("pgd-linf-v1", 0.2): 0.6},
        {},
        {},
        "fgsm-linf-v1 10.0% vs pgd-linf-v1 60.0% at linf 0.2",
    ),
    (
        "black-box-beats-white-box",
        {("square-linf-v1", 0.2): 0.1, ("pgd-linf-v1", 0.2): 0.6},
        {},
        {},
        "square-linf-v1 10.0% vs pgd-linf-v1 60.0%",
    ),
    (
        "black-box-beats-white-box",
        {("transfer-pgd-linf-v1", 0.2): 0.2, ("pgd-linf-v1", 0.2): 0.6},
        {},
        {},
        "transfer-pgd-linf-v1",
    ),
    ("black-box-beats-white-box", {("noise-linf-v1", 0.2): 0.2, ("pgd-linf-v1", 0.2): 0.6}, {}, {}, "noise-linf-v1"),
    (
        "accuracy-rises-with-eps",
        {("pgd-linf-v1", 0.1): 0.2, ("pgd-linf-v1", 0.3): 0.5},
        {},
        {},
        "pgd-linf-v1: 20.0% at linf 0.1 but 50.0% at 0.3",
    ),
    (
        "not-near-chance",
        {("pgd-linf-v1", 0.1): 0.8, ("pgd-linf-v1", 0.3): 0.7},
        {},
        {},
        "worst case 70.0% at linf 0.3 (chance 10.0%)",
    ),
    (
        "standard-evaluation-unreliable",
        {("pgd-linf-v1", 0.2): 0.6, ("eot-pgd-linf-v1", 0.2): 0.3},
        {},
        {},
        "eot-pgd-linf-v1 30.0% vs pgd-linf-v1 60.0%",
    ),
    (
        "zero-gradients",
        {("pgd-linf-v1", 0.2): 0.0},
        {"vanishing_gradient_ce": 0.5, "zero_gradient_ce": 0.25},
        {},
        "vanish on 50.0% of probed examples (cross-entropy) and 0.0% (DLR); exactly zero on 25.0%",
    ),
    ("probability-outputs", {("pgd-linf-v1", 0.2): 0.0}, {"probability_like": True}, {}, "sum to 1"),
    (
        "undeclared-randomness",
        {("pgd-linf-v1", 0.2): 0.0},
        {"randomized": True, "max_output_difference": 0.3},
        {},
        "differ by up to 0.3",
    ),
]


@pytest.mark.parametrize("key, cells, observed, nature, evidence", FLAG_CASES)
def test_each_masking_flag_fires_with_its_evidence(tmp_path, key, cells, observed, nature, evidence):
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", cells, observed=observed, nature=nature)])
    flags = _flags(_entry(build_report(db), "d-v1"))
    assert key in flags, flags
    assert evidence in flags[key]


def test_no_flags_on_a_clean_evaluation_and_declared_randomness(tmp_path):
    cells = {
        ("fgsm-linf-v1", 0.1): 0.7,
        ("pgd-linf-v1", 0.1): 0.6,
        ("square-linf-v1", 0.1): 0.65,
        ("fgsm-linf-v1", 0.3): 0.2,
        ("pgd-linf-v1", 0.3): 0.05,
        ("square-linf-v1", 0.3): 0.1,
    }
    db = write_database(
        tmp_path / "r.db",
        [FakeDefense("d-v1", cells, observed={"randomized": True}, nature={"randomized": True})],
    )
    assert _entry(build_report(db), "d-v1")["flags"] == []


def test_the_cascade_is_not_an_adaptive_attack_beating_the_standard_ones(tmp_path):
    cells = {("pgd-linf-v1", 0.2): 0.6, ("square-linf-v1", 0.2): 0.58, ("adaptive-worst-case-linf-v1", 0.2): 0.3}
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", cells)])
    assert "standard-evaluation-unreliable" not in _flags(_entry(build_report(db), "d-v1"))


def test_seeds_are_pooled_for_intervals(tmp_path):
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): 0.5}, seeds=(0, 1))], n=50)
    report = build_report(db)
    (cell,) = _entry(report, "d-v1")["cells"]
    assert cell["n"] == 100 and report["datasets"][0]["seeds"] == [0, 1]
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(wilson_interval(50, 100))


def test_files_are_written_with_numbers_as_numbers(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("plugin-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-l2-v1", 1.0): 0.2}, source="my-plugin==0.1.0"),
            FakeDefense("standard-v1", {("pgd-linf-v1", 0.2): 0.0, ("pgd-l2-v1", 1.0): 0.0}),
        ],
    )
    written = {p.name for p in write_leaderboard(db, tmp_path / "out")}
    assert {
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.json",
        "index.html",
        "heatmap.png",
        "curves-linf.png",
        "curves-l2.png",
    } <= written
    report = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    validate(report)
    entry = report["datasets"][0]["defenses"][0]
    assert entry["defense"] == "plugin-v1" and entry["source"] == "my-plugin==0.1.0"
    assert isinstance(entry["clean"]["value"], float) and isinstance(entry["cells"][0]["eps"], float)
    rows = list(csv.DictReader((tmp_path / "out" / "leaderboard.csv").open()))
    assert rows[0]["defense"] == "plugin-v1" and float(rows[0]["pgd-linf-v1 linf 0.2"]) == 0.5
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "my-plugin==0.1.0" in markdown and "nan" not in markdown
    html = (tmp_path / "out" / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "data:image/png;base64," in html


def test_validation_refuses_a_malformed_report(tmp_path):
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): 0.5})])
    report = build_report(db)
    report["datasets"][0]["defenses"][0]["cells"][0]["robust_accuracy"] = "0.5"
    with pytest.raises(ReportError, match="must be a finite number"):
        validate(report)
    report = build_report(db)
    report["datasets"][0]["defenses"][0]["worst_case_by_threat"][0]["value"] = 0.9
    with pytest.raises(ReportError):
        validate(report)


def test_html_in_a_defense_name_is_escaped(tmp_path):
    name = "<script>window.__pwned=1</script>evil-v1"
    db = write_database(tmp_path / "r.db", [FakeDefense(name, {("pgd-linf-v1", 0.2): 0.5})])
    write_leaderboard(db, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "<script>window.__pwned" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;evil-v1" in html


def test_an_empty_database_is_a_clear_error(tmp_path):
    from bench.store import Store

    Store.open(tmp_path / "empty.db").close()
    with pytest.raises(RobustMatrixError, match="holds no evaluated defenses yet"):
        write_leaderboard(tmp_path / "empty.db", tmp_path / "out")


def test_competitive_ratio_is_undefined_where_no_defense_keeps_five_percent(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-linf-v1", 0.3): 0.01}, trained_against=LINF_02),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.2): 0.25, ("pgd-linf-v1", 0.3): 0.0}, trained_against=LINF_02),
        ],
    )
    report = build_report(db)
    b = {t["eps"]: t["relative"] for t in _entry(report, "b-v1")["worst_case_by_threat"]}
    assert b == {0.2: pytest.approx(0.5), 0.3: None}, "one example out of a hundred sets no bar"


def test_a_collapsed_training_is_flagged(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("collapsed-v1", {("pgd-linf-v1", 0.2): 0.1}, clean=0.1),
            FakeDefense("fine-v1", {("pgd-linf-v1", 0.2): 0.0}, clean=0.9),
        ],
    )
    report = build_report(db)
    assert "clean accuracy 10.0% (chance 10.0%)" in _flags(_entry(report, "collapsed-v1"))["clean-near-chance"]
    assert "clean-near-chance" not in _flags(_entry(report, "fine-v1"))
