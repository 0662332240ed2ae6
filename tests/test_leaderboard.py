"""The leaderboard from synthetic databases with chosen outcomes: per-example worst case, seen vs
unseen, competitive ratio, every masking flag with its evidence, ranking, and the written files."""

from __future__ import annotations

import csv
import itertools
import json
import re
import sqlite3

import numpy as np
import pytest

from bench.foundation.errors import RobustMatrixError
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


def test_worst_case_nests_threat_models_so_it_never_rises_with_eps(tmp_path):
    """An example an attack broke at eps 0.1 is broken at 0.3 too, even where the attack at 0.3
    missed it (a randomized defense's draw, a masked gradient): the ball at 0.3 holds the point."""
    small = np.ones(100, dtype=bool)
    small[:40] = False
    large = np.ones(100, dtype=bool)
    large[30:60] = False
    db = write_database(
        tmp_path / "r.db",
        [FakeDefense("d-v1", {("pgd-linf-v1", 0.1): small, ("pgd-linf-v1", 0.3): large, ("pgd-l2-v1", 1.0): large})],
    )
    by_threat = {(t["norm"], t["eps"]): t["value"] for t in _entry(build_report(db), "d-v1")["worst_case_by_threat"]}
    assert by_threat[("linf", 0.1)] == pytest.approx(0.60)
    assert by_threat[("linf", 0.3)] == pytest.approx(0.40), "0-59 broken within 0.3, not 0.70 nor 0.60"
    assert by_threat[("l2", 1.0)] == pytest.approx(0.70), "another norm's balls do not nest"


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
        "fgsm-linf-v1 10.0% vs pgd-linf-v1 60.0% at linf 0.2 (paired: 50 examples broken only by the first, 0 only "
        "by the second; one-sided p < 1e-4)",
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
        "worst case 70.0% at linf 0.3 (chance 10.0%; above chance + 15 points with one-sided p < 1e-4)",
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
        "vanish on 32 of 64 probed correctly classified examples (50.0%) with cross-entropy and 0 (0.0%) with DLR; "
        "exactly zero on 25.0%",
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
    assert "http://" not in html and "https://" not in html and '<svg class="generalization"' in html


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


def test_html_in_a_defense_source_is_escaped(tmp_path):
    # A defense id is checked against its pattern before it is stored; a plugin's source is free text.
    source = "<script>window.__pwned=1</script>evil"
    db = write_database(tmp_path / "r.db", [FakeDefense("evil-v1", {("pgd-linf-v1", 0.2): 0.5}, source=source)])
    write_leaderboard(db, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "<script>window.__pwned" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;evil" in html
    with pytest.raises(ValueError, match="is not an id"):
        write_database(tmp_path / "bad.db", [FakeDefense("<script>x</script>evil-v1", {("pgd-linf-v1", 0.2): 0.5})])


def test_an_empty_database_is_a_clear_error(tmp_path):
    from bench.storage.store import Store

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


# ------------------------------------------------------------------ ranking over the dataset's threat models


def test_a_defense_missing_a_threat_model_is_unranked_not_first(tmp_path):
    """Its l2 cell failed: averaged over its own threat models (linf only) it would rank first with
    0.9. It is listed after the ranked defenses, worst case null, the missing threat model named."""
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("partial-v1", {("pgd-linf-v1", 0.2): 0.9}, failed=[("pgd-l2-v1", 1.0)]),
            FakeDefense("full-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-l2-v1", 1.0): 0.3}),
            FakeDefense("weak-v1", {("pgd-linf-v1", 0.2): 0.1, ("pgd-l2-v1", 1.0): 0.0}),
        ],
    )
    report = build_report(db)
    data = report["datasets"][0]
    assert [(d["defense"], d["rank"]) for d in data["defenses"]] == [
        ("full-v1", 1),
        ("weak-v1", 2),
        ("partial-v1", None),
    ]
    partial = _entry(report, "partial-v1")
    assert partial["worst_case"] is None
    assert partial["missing_threat_models"] == [{"norm": "l2", "eps": 1.0}]
    assert [t["value"] for t in partial["worst_case_by_threat"]] == [0.9], "what it has is still shown"
    assert _entry(report, "full-v1")["missing_threat_models"] == []
    assert data["failed_cells"][0]["attack"] == "pgd-l2-v1"

    write_leaderboard(db, tmp_path / "out")
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| partial-v1 (incomplete)" in markdown
    assert "**partial-v1 (incomplete)** is not ranked: it has no result at l2 1" in markdown
    html = (tmp_path / "out" / "index.html").read_text()
    assert 'title="not ranked: no result at l2 1">incomplete</span>' in html
    rows = {r["defense"]: r for r in csv.DictReader((tmp_path / "out" / "leaderboard.csv").open())}
    assert rows["partial-v1"]["rank"] == "" and rows["partial-v1"]["worst case"] == ""
    assert rows["partial-v1"]["missing threat models"] == "l2 1" and rows["full-v1"]["rank"] == "1"


def test_a_threat_model_only_one_defense_has_is_a_visible_warning(tmp_path):
    """`run --defense new-v1 --config` that adds an eps: the others are unranked, and told why."""
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5}),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.2): 0.3}),
            FakeDefense("new-v1", {("pgd-linf-v1", 0.2): 0.4, ("pgd-linf-v1", 0.4): 0.1}),
        ],
    )
    data = build_report(db)["datasets"][0]
    assert [d["rank"] for d in data["defenses"]] == [1, None, None]
    (warning,) = data["warnings"]
    assert warning.startswith("only 1 of 3 defenses have results at linf 0.4 (new-v1): the others are listed unranked")


# ------------------------------------------------------------------------------------- validation


def _set(path, value):
    """A corruption: set the value at ``path`` (keys and indexes from the report root)."""

    def corrupt(report):
        target = report
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return corrupt


def _delete(path):
    def corrupt(report):
        target = report
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return corrupt


def _add_flag(flag):
    def corrupt(report):
        report["datasets"][0]["defenses"][0]["flags"].append(flag)

    return corrupt


D0 = ("datasets", 0, "defenses", 0)
CELL0 = (*D0, "cells", 0)
CORRUPTIONS = {
    "ci_low is a string": _set((*CELL0, "ci_low"), "abc"),
    "negative n": _set((*CELL0, "n"), -5),
    "fractional n": _set((*CELL0, "n"), 99.5),
    "seen is a number": _set((*D0, "seen"), 7.0),
    "relative above 1": _set((*CELL0, "relative"), 2.5),
    "worst case is not the mean over threat models": _set((*D0, "worst_case"), 0.05),
    "unknown flag with a non-string title": _add_flag({"key": "made-up", "title": 3, "evidence": "x"}),
    "known flag with the wrong title": _add_flag({"key": "zero-gradients", "title": "other", "evidence": "x"}),
    "strongest attack is a number": _set((*D0, "strongest_attack"), 3),
    "source is null": _set((*D0, "source"), None),
    "missing defense key": _delete((*D0, "gap")),
    "missing cell key": _delete((*CELL0, "ci_high")),
    "missing dataset key": _delete(("datasets", 0, "threat_models")),
    "missing schema": _delete(("schema",)),
    "unknown key": _set((*D0, "surprise"), 1),
    "value outside its interval": _set((*CELL0, "ci_high"), 0.1),
    "interval is not Wilson's": _set((*CELL0, "ci_low"), 0.01),
    "value is not a proportion of n": _set((*CELL0, "robust_accuracy"), 0.2001),
    "NaN": _set((*D0, "unseen"), float("nan")),
    "gap is not seen minus unseen worst case": _set(("datasets", 0, "defenses", 1, "gap"), 0.2),
    "ratio is not unseen over seen worst case": _set(("datasets", 0, "defenses", 1, "ratio"), 0.5),
    "seen contradicts trained_against": _set((*CELL0, "seen"), True),
    "unknown family": _set((*CELL0, "family"), "magic"),
    "rank out of order": _set((*D0, "rank"), 2),
    "ranked without a worst case": _set((*D0, "worst_case"), None),
    "negative training time": _set((*D0, "training", "wall_time"), -1.0),
    "clean n is a bool": _set((*D0, "clean", "n"), True),
    "numpy integer": _set((*CELL0, "forwards"), np.int64(10)),
    "seeds not integers": _set(("datasets", 0, "seeds"), [0.5]),
    "threat model missing from the dataset list": _set(("datasets", 0, "threat_models"), []),
}


REFUSALS = {
    "ci_low is a string": "ci_low must be a finite number",
    "negative n": "n must be an integer >= 0",
    "fractional n": "n must be an integer, got 99.5",
    "seen is a number": "seen must be in [0, 1]",
    "relative above 1": "relative must be in [0, 1]",
    "worst case is not the mean over threat models": "worst_case (the mean over the dataset's threat models) is 0.05",
    "unknown flag with a non-string title": "unknown flag 'made-up'",
    "known flag with the wrong title": "flag zero-gradients must have the title",
    "strongest attack is a number": "strongest_attack must be a non-empty string",
    "source is null": "source must be a non-empty string, got None",
    "missing defense key": "is missing gap",
    "missing cell key": "is missing ci_high",
    "missing dataset key": "is missing threat_models",
    "missing schema": "report is missing schema",
    "unknown key": "unknown key(s) surprise",
    "value outside its interval": "outside its confidence interval",
    "interval is not Wilson's": "is not the 95% Wilson interval",
    "value is not a proportion of n": "is not a proportion of 100 examples",
    "NaN": "nan is not a JSON number",
    "gap is not seen minus unseen worst case": "gap is 0.2 but its definition gives",
    "ratio is not unseen over seen worst case": "ratio is 0.5 but its definition gives",
    "seen contradicts trained_against": "seen contradicts its family and trained_against",
    "unknown family": "family must be one of",
    "rank out of order": "ranks must be 1..n in order",
    "ranked without a worst case": "worst_case (the mean over the dataset's threat models) is None",
    "negative training time": "training.wall_time must be >= 0",
    "clean n is a bool": "clean.n must be an integer, got True",
    "numpy integer": "int64 is not a JSON value",
    "seeds not integers": "seeds[] must be an integer",
    "threat model missing from the dataset list": "worst_case_by_threat and missing_threat_models must split",
}
"""What the validator must say for each corruption: the check meant for it fired, not another one."""


@pytest.fixture(scope="module")
def valid_report(tmp_path_factory):
    db = write_database(
        tmp_path_factory.mktemp("valid") / "r.db",
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-l2-v1", 1.0): 0.2}),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.2): 0.1, ("pgd-l2-v1", 1.0): 0.0}, trained_against=LINF_02),
        ],
    )
    return build_report(db)


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_validation_refuses_each_corruption(valid_report, corruption):
    import copy

    validate(valid_report)
    report = copy.deepcopy(valid_report)
    CORRUPTIONS[corruption](report)
    with pytest.raises(ReportError, match=re.escape(REFUSALS[corruption])):
        validate(report)


def test_validation_error_names_the_missing_key(valid_report):
    import copy

    report = copy.deepcopy(valid_report)
    del report["datasets"][0]["defenses"][0]["cells"][0]["ci_high"]
    with pytest.raises(ReportError, match="missing ci_high"):
        validate(report)


# ------------------------------------------------------------------- summary columns and seen/unseen gap


def test_gap_and_ratio_compare_worst_cases_not_different_attack_mixes(tmp_path):
    """Trained for linf 0.2, robust there (0.6 under PGD) and weaker at l2 (0.3). Noise at linf 0.3
    leaves 0.95 — it is an unseen *cell*, so the unseen cell mean (0.61) would exceed the seen one
    and the cell gap come out negative. On worst cases per threat model the gap is the real one."""
    cells = {
        ("pgd-linf-v1", 0.2): 0.6,
        ("noise-linf-v1", 0.2): 0.9,
        ("pgd-l2-v1", 1.0): 0.3,
        ("pgd-linf-v1", 0.3): 0.6,
        ("noise-linf-v1", 0.3): 0.95,
    }
    db = write_database(tmp_path / "r.db", [FakeDefense("at-v1", cells, trained_against=LINF_02)])
    entry = _entry(build_report(db), "at-v1")
    assert entry["seen"] == pytest.approx(0.6), "the issue's definition: seen white-box cells"
    assert entry["unseen"] == pytest.approx((0.9 + 0.3 + 0.6 + 0.95) / 4), "every other cell"
    assert entry["unseen"] > entry["seen"]
    assert entry["seen_worst_case"] == pytest.approx(0.6)
    assert entry["unseen_worst_case"] == pytest.approx((0.3 + 0.6) / 2)
    assert entry["gap"] == pytest.approx(0.6 - 0.45) and entry["ratio"] == pytest.approx(0.45 / 0.6)


def test_ratio_and_worst_competitive_ratios_are_in_every_summary(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense(
                "linf-at-v1",
                {("pgd-linf-v1", 0.2): 0.6, ("pgd-linf-v1", 0.1): 0.8, ("pgd-l2-v1", 1.5): 0.1},
                trained_against=LINF_02,
            ),
            FakeDefense(
                "l2-at-v1",
                {("pgd-linf-v1", 0.2): 0.3, ("pgd-linf-v1", 0.1): 0.4, ("pgd-l2-v1", 1.5): 0.4},
                trained_against=[{"norm": "l2", "eps": 1.5, "attack": "pgd"}],
            ),
        ],
    )
    write_leaderboard(db, tmp_path / "out")
    rows = {r["defense"]: r for r in csv.DictReader((tmp_path / "out" / "leaderboard.csv").open())}
    linf = rows["linf-at-v1"]
    assert float(linf["ratio"]) == pytest.approx(0.1 / 0.7, abs=5e-5), "rounded to 4 decimals"
    assert float(linf["rel. seen (worst)"]) == pytest.approx(1.0)
    assert float(linf["rel. unseen (worst)"]) == pytest.approx(0.25)
    assert float(rows["l2-at-v1"]["rel. unseen (worst)"]) == pytest.approx(0.4 / 0.8)
    header = (tmp_path / "out" / "leaderboard.md").read_text().split("\n| ---")[0]
    for column in ("ratio", "rel. seen (worst)", "rel. unseen (worst)", "wc seen", "wc unseen"):
        assert f" {column} " in header, column
    html = (tmp_path / "out" / "index.html").read_text()
    cells = re.findall(r'<td data-v="[^"]*">([^<]*)</td>', html)
    assert "0.14" in cells, "the ratio"
    assert "1.00 / 1.00" in cells and "0.25 / 0.25" in cells, "average / worst"


def test_strongest_attack_tooltip_describes_the_summed_lead(tmp_path):
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): 0.5})])
    write_leaderboard(db, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "largest total lead over the runner-up attack, summed over the Lp threat models" in html
    assert "strongest at most Lp threat models" not in html


# ----------------------------------------------------------------------------- sample-size-aware flags


def _masks(n, robust_under_both, only_first, only_second):
    """Two robust masks over n examples: both robust on the first ``robust_under_both``, then
    ``only_first`` examples robust only under the first, then ``only_second`` only under the second."""
    first, second = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    first[:robust_under_both] = second[:robust_under_both] = True
    start = robust_under_both
    first[start : start + only_first] = True
    start += only_first
    second[start : start + only_second] = True
    return first, second


def test_a_difference_inside_the_noise_raises_no_flag(tmp_path):
    """The quick matrix's random-resize-pad: FGSM 11% vs APGD-CE 14% on 100 examples, 13 examples
    broken only by FGSM and 10 only by APGD (p = 0.34). Three points, not a sign of masking."""
    apgd, fgsm = _masks(100, 1, 13, 10)  # apgd robust on 1 + 13 = 14, fgsm on 1 + 10 = 11
    db = write_database(
        tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): apgd, ("fgsm-linf-v1", 0.2): fgsm})]
    )
    assert "single-step-beats-iterative" not in _flags(_entry(build_report(db), "d-v1"))


def test_a_paired_difference_that_is_significant_raises_the_flag(tmp_path):
    """random-resize-pad at l2 1: EOT 5% vs APGD-CE 13%, 11 examples broken only by EOT and 3 only
    by APGD: p = 0.029 < ALPHA."""
    apgd, eot = _masks(100, 2, 11, 3)  # apgd robust on 13, eot on 5
    db = write_database(
        tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): apgd, ("eot-pgd-linf-v1", 0.2): eot})]
    )
    evidence = _flags(_entry(build_report(db), "d-v1"))["standard-evaluation-unreliable"]
    assert "eot-pgd-linf-v1 5.0% vs pgd-linf-v1 13.0%" in evidence
    assert "11 examples broken only by the first, 3 only by the second; one-sided p = 0.029" in evidence


def test_the_same_point_difference_is_significant_or_not_depending_on_the_pairs(tmp_path):
    """8 points both times. 12 examples broken only by EOT and 4 only by APGD: p = 0.038, flagged.
    20 and 12: p = 0.11 — the attacks disagree on too many examples to call either stronger."""
    for name, (both, only_apgd, only_eot), fires in (("a", (1, 12, 4), True), ("b", (0, 20, 12), False)):
        apgd, eot = _masks(100, both, only_apgd, only_eot)
        assert round(100 * (apgd.mean() - eot.mean())) == 8
        cells = {("pgd-linf-v1", 0.2): apgd, ("eot-pgd-linf-v1", 0.2): eot}
        db = write_database(tmp_path / f"{name}.db", [FakeDefense("d-v1", cells)])
        assert ("standard-evaluation-unreliable" in _flags(_entry(build_report(db), "d-v1"))) is fires, name


def test_an_adaptive_attack_must_beat_every_standard_gradient_attack_significantly(tmp_path):
    """Distillation's pattern: logit-space PGD breaks it, cross-entropy PGD does not. With a margin
    attack in the standard set that also breaks it, a standard evaluation was not fooled: no flag."""
    ce = {("pgd-linf-v1", 0.2): 0.83, ("eot-pgd-linf-v1", 0.2): 0.0}
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", ce)])
    assert "standard-evaluation-unreliable" in _flags(_entry(build_report(db), "d-v1"))
    db = write_database(tmp_path / "r2.db", [FakeDefense("d-v1", {**ce, ("pgd-margin-linf-v1", 0.2): 0.01})])
    assert "standard-evaluation-unreliable" not in _flags(_entry(build_report(db), "d-v1"))


def test_black_box_flag_says_what_it_compares_with(tmp_path):
    """It compares with standard gradient attacks only: an adaptive (BPDA) attack may be stronger."""
    cells = {("square-linf-v1", 0.2): 0.1, ("pgd-linf-v1", 0.2): 0.6, ("bpda-pgd-linf-v1", 0.2): 0.0}
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", cells)])
    (flag,) = [f for f in _entry(build_report(db), "d-v1")["flags"] if f["key"] == "black-box-beats-white-box"]
    assert flag["title"] == "a black-box, transfer or noise attack beats every standard gradient attack"


@pytest.mark.parametrize(
    "observed, fires",
    [
        ({"vanishing_gradient_dlr": 1 / 64, "zero_gradient_dlr": 1 / 64}, False),  # one example of 64
        ({"vanishing_gradient_ce": 2 / 64}, False),  # two: below the minimum count
        ({"vanishing_gradient_ce": 5 / 64}, False),  # five, but under 10%
        ({"vanishing_gradient_ce": 7 / 64}, True),  # seven, 10.9%
        ({"vanishing_gradient_ce": 0.935}, True),  # distillation's saturated cross-entropy
        ({"vanishing_gradient_ce": 1.0, "vanishing_gradient_dlr": 1.0, "zero_gradient_ce": 1.0}, True),  # quantization
    ],
)
def test_zero_gradients_needs_a_sizeable_share_of_examples(tmp_path, observed, fires):
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): 0.0}, observed=observed)])
    assert ("zero-gradients" in _flags(_entry(build_report(db), "d-v1"))) is fires


def test_not_near_chance_needs_significance(tmp_path):
    """Chance + 15 points is 25%: 28% of 100 examples is inside the noise (p = 0.27), 40% is not."""
    for value, fires in ((0.28, False), (0.40, True)):
        db = write_database(tmp_path / f"{value}.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.3): value})])
        assert ("not-near-chance" in _flags(_entry(build_report(db), "d-v1"))) is fires, value


def test_accuracy_rising_with_eps_is_a_paired_test_too(tmp_path):
    smaller, larger = _masks(100, 20, 0, 5)  # 5 examples robust only at the larger eps: p = 0.03
    db = write_database(
        tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.1): smaller, ("pgd-linf-v1", 0.3): larger})]
    )
    evidence = _flags(_entry(build_report(db), "d-v1"))["accuracy-rises-with-eps"]
    assert "pgd-linf-v1: 20.0% at linf 0.1 but 25.0% at 0.3" in evidence
    assert "(paired: 5 examples broken only at the smaller eps, 0 only at the larger; one-sided p = 0.031)" in evidence
    smaller, larger = _masks(100, 20, 4, 7)  # 7 vs 4 the other way: 3 points, p = 0.27
    db = write_database(
        tmp_path / "r2.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.1): smaller, ("pgd-linf-v1", 0.3): larger})]
    )
    assert "accuracy-rises-with-eps" not in _flags(_entry(build_report(db), "d-v1"))


# ------------------------------------------------------------------------------- evaluation sizes


def test_defenses_evaluated_on_another_n_eval_get_their_own_section_and_a_warning(tmp_path, capsys):
    """`run --defense new-v1 --config` with n_eval 50 after a run with 100: nothing is dropped."""
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5}),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.2): 0.3}),
            FakeDefense("new-v1", {("pgd-linf-v1", 0.2): 0.4}, n_eval=50),
        ],
    )
    report = build_report(db)
    sections = [(d["n_eval"], [e["defense"] for e in d["defenses"]]) for d in report["datasets"]]
    assert sections == [(50, ["new-v1"]), (100, ["a-v1", "b-v1"])], "the newest size first"
    (warning,) = report["datasets"][0]["warnings"]
    assert "not in it, because they were evaluated only on other sizes: a-v1, b-v1" in warning
    assert "this table ranks the 2 defenses evaluated on 100 examples" in report["datasets"][1]["warnings"][0]
    written = {p.name for p in write_leaderboard(db, tmp_path / "out")}
    assert {"digits-n50-heatmap.png", "digits-n100-heatmap.png"} <= written
    assert "warning: digits has results on 2 evaluation sizes" in capsys.readouterr().err
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "## digits (50 evaluation examples)" in markdown and "> **Warning:** digits has results" in markdown
    html = (tmp_path / "out" / "index.html").read_text()
    assert '<p class="warning"><strong>Warning:</strong> digits has results on 2 evaluation sizes' in html
    assert 'id="dataset-digits-n50"' in html and 'id="dataset-digits-n100"' in html


def test_a_single_evaluation_size_has_no_warning(tmp_path):
    db = write_database(tmp_path / "r.db", [FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5})])
    assert build_report(db)["datasets"][0]["warnings"] == []


# ----------------------------------------------------------------------------- reference and contribution


def _breaking(n: int, *ranges: tuple[int, int]) -> np.ndarray:
    """A robust mask over n examples, broken on the half-open ``ranges``."""
    robust = np.ones(n, dtype=bool)
    for start, stop in ranges:
        robust[start:stop] = False
    return robust


def test_autoattack_sits_beside_the_worst_case_never_in_it_and_its_extra_breaks_are_flagged(tmp_path):
    ours = _breaking(100, (40, 100))
    autoattack = _breaking(100, (38, 100))  # two examples (38, 39) only AutoAttack broke
    db = write_database(
        tmp_path / "r.db",
        [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): ours, ("autoattack-standard-linf-v1", 0.2): autoattack})],
        attacks={"autoattack-standard-linf-v1": ("reference", None, "linf")},
    )
    (dataset,) = build_report(db)["datasets"]
    (entry,) = dataset["defenses"]
    (threat,) = entry["worst_case_by_threat"]
    assert threat["value"] == pytest.approx(0.40), "the reference is not part of the worst case"
    assert threat["reference"]["value"] == pytest.approx(0.38)
    assert threat["reference"]["beyond"] == 2 and threat["reference"]["beyond_examples"] == {"0": [38, 39]}
    (flag,) = [f for f in entry["flags"] if f["key"] == "weaker-than-reference"]
    assert "2 examples only it broke" in flag["evidence"] and "[38, 39]" in flag["evidence"]
    write_leaderboard(db, tmp_path / "out")
    assert "### Against the reference evaluation" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_no_flag_when_the_worst_case_breaks_everything_autoattack_does(tmp_path):
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense(
                "d-v1",
                {
                    ("pgd-linf-v1", 0.2): _breaking(100, (40, 100)),
                    ("autoattack-standard-linf-v1", 0.2): _breaking(100, (45, 100)),
                },
            )
        ],
        attacks={"autoattack-standard-linf-v1": ("reference", None, "linf")},
    )
    (entry,) = build_report(db)["datasets"][0]["defenses"]
    assert entry["worst_case_by_threat"][0]["reference"]["beyond"] == 0
    assert not [f for f in entry["flags"] if f["key"] == "weaker-than-reference"]


def test_the_strongest_attack_is_the_one_whose_removal_raises_the_worst_case_most(tmp_path):
    """PGD and its margin variant break the same 60 examples (lowest mean, but each is redundant);
    Square breaks fewer, yet 5 of them nobody else does: without Square the worst case rises."""
    db = write_database(
        tmp_path / "r.db",
        [
            FakeDefense(
                "d-v1",
                {
                    ("pgd-linf-v1", 0.2): _breaking(100, (40, 100)),
                    ("pgd-margin-linf-v1", 0.2): _breaking(100, (40, 100)),
                    ("square-linf-v1", 0.2): _breaking(100, (0, 5), (60, 100)),
                },
            )
        ],
    )
    (entry,) = build_report(db)["datasets"][0]["defenses"]
    (threat,) = entry["worst_case_by_threat"]
    assert threat["value"] == pytest.approx(0.35)
    assert threat["strongest_attack"] == "square-linf-v1"
    assert entry["strongest_attack"] == "square-linf-v1"


# --------------------------------------------------------------------- a database someone sent
def _sql(db, statement, *parameters):
    connection = sqlite3.connect(db)
    try:
        with connection:
            connection.execute(statement, parameters)
    finally:
        connection.close()


def _two_defenses(tmp_path):
    return write_database(
        tmp_path / "r.db",
        [
            FakeDefense("a-v1", {("pgd-linf-v1", 0.2): 0.5, ("pgd-l2-v1", 1.0): 0.2}),
            FakeDefense("b-v1", {("pgd-linf-v1", 0.2): 0.1, ("pgd-l2-v1", 1.0): 0.0}),
        ],
    )


def test_the_leaderboard_opens_the_database_read_only_and_never_changes_it(tmp_path):
    db = _two_defenses(tmp_path)
    _sql(db, "DROP TABLE nightly")  # from before the operations tables: reading it must not add them
    before = db.read_bytes()
    write_leaderboard(db, tmp_path / "out")
    assert db.read_bytes() == before


@pytest.mark.parametrize(
    "statement, message",
    [
        ("UPDATE cells SET norm = '../../escape' WHERE attack_id = 'pgd-l2-v1'", "norm '../../escape'"),
        ("UPDATE cells SET attack_id = '=1+1-v1' WHERE attack_id = 'pgd-l2-v1'", "attack_id '=1+1-v1'"),
        ("UPDATE trainings SET defense_id = '| **x** |-v1' WHERE defense_id = 'a-v1'", "defense_id"),
        ("UPDATE trainings SET dataset = '../digits'", "dataset '../digits'"),
        ("UPDATE cells SET robust_mask = substr(robust_mask, 1, 3)", "cannot hold 100 examples"),
        ("UPDATE evaluations SET clean_mask = substr(clean_mask, 1, 3)", "cannot hold 100 examples"),
    ],
)
def test_names_and_masks_are_checked_before_they_reach_files(tmp_path, statement, message):
    db = _two_defenses(tmp_path)
    _sql(db, statement)
    with pytest.raises(RobustMatrixError, match=re.escape(message)) as caught:
        write_leaderboard(db, tmp_path / "out")
    assert "\n" not in str(caught.value) and str(db) in str(caught.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("**/*.png"))


def test_csv_cells_that_a_spreadsheet_would_run_are_plain_text(tmp_path):
    defenses = [
        FakeDefense(f"d{i}-v1", {("pgd-linf-v1", 0.2): 0.5}, source=source)
        for i, source in enumerate(['=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "plain==1.0"])
    ]
    db = write_database(tmp_path / "r.db", defenses)
    write_leaderboard(db, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "leaderboard.csv").open()))
    sources = {row["defense"]: row["source"] for row in rows}
    assert sources == {
        "d0-v1": '\'=HYPERLINK("http://x")',
        "d1-v1": "'+1",
        "d2-v1": "'-2+3",
        "d3-v1": "'@SUM(A1)",
        "d4-v1": "plain==1.0",
    }
    assert float(rows[0]["pgd-linf-v1 linf 0.2"]) == 0.5, "numbers stay numbers"


def test_markdown_tables_keep_their_columns_whatever_a_source_says(tmp_path):
    sources = ["a | b", "line one\nline two", "x\\|y"]
    defenses = [FakeDefense(f"d{i}-v1", {("pgd-linf-v1", 0.2): 0.5}, source=source) for i, source in enumerate(sources)]
    db = write_database(tmp_path / "r.db", defenses)
    write_leaderboard(db, tmp_path / "out")
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and "source" in line)
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[header:]))
    assert len(table) == 2 + len(sources), "one line per defense: no line break escaped the cell"
    assert {_delimiters(line) for line in table} == {_delimiters(table[0])}
    assert "a \\| b" in text and "line one line two" in text


def _delimiters(row: str) -> int:
    """How many cell delimiters GitHub's table parser sees in a row: a backslash escapes the next character."""
    count, escaped = 0, False
    for char in row:
        count += char == "|" and not escaped
        escaped = char == "\\" and not escaped
    return count
