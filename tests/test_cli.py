"""The command line: listings, and bad input answered with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.conftest import TINY_MATRIX, run_cli, run_cli_subprocess, write_matrix


def _one_line_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("robustmatrix: error:")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_list_json_describes_every_component():
    result = run_cli("list", "--json")
    assert result.code == 0
    entries = json.loads(result.stdout)
    kinds = {e["kind"] for e in entries}
    assert kinds == {"defense", "attack"}
    by_id = {e["id"]: e for e in entries}
    assert by_id["pgd-at-linf-v1"]["trained_against"] == [{"attack": "pgd", "eps": 0.2, "norm": "linf"}]
    assert by_id["pgd-linf-v1"]["family"] == "gradient" and by_id["pgd-linf-v1"]["norm"] == "linf"
    assert by_id["pgd-linf-v1"]["budget"]["steps"] == 20
    for entry in entries:
        assert {"id", "kind", "description", "source", "kwargs"} <= set(entry)


def test_list_shows_the_budget_each_attack_declares():
    """The budget column is what the attack spends, not only what its kwargs spell: noise draws and a
    spatial grid are queries, APGD-T runs once per target, EOT's passes count every draw."""
    by_id = {e["id"]: e["budget"] for e in json.loads(run_cli("list", "--json", "--kind", "attack").stdout)}
    assert by_id["noise-linf-v1"]["queries"] == 20
    assert by_id["spatial-v1"]["queries"] == 5 * 3 * 3
    apgd_t = by_id["apgd-t-linf-v1"]
    assert apgd_t["restarts"] > 1 and apgd_t["forwards"] > apgd_t["steps"] * apgd_t["restarts"]
    eot = by_id["eot-pgd-linf-v1"]
    assert (eot["forwards"], eot["backwards"]) == (eot["steps"] * 6 + 1, eot["steps"] * 6)
    assert by_id["pgd-linf-v1"]["forwards"] == 21


def test_list_table_and_wildcards():
    result = run_cli("list", "pgd*")
    assert result.code == 0
    assert "pgd-at-linf-v1" in result.stdout and "pgd-linf-v1" in result.stdout
    assert "fgsm-linf-v1" not in result.stdout


@pytest.fixture
def tiny_config(tmp_path):
    return write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)


@pytest.mark.parametrize(
    "toml, fragments",
    [
        ('defenses = ["standard-v2"]', ["unknown defense 'standard-v2'", "did you mean standard-v1"]),
        ('attacks = ["pgd-lnf-v1"]', ["unknown attack 'pgd-lnf-v1'", "pgd-linf-v1"]),
        ("dataset = 'digits'\nn_eval = [", ["malformed TOML"]),
        ('n_eval = "300"', ["'n_eval' must be a positive integer"]),
        ("[eps]\nlinf = ['0.1']", ["eps.linf must be a non-empty list of non-negative numbers"]),
        ("colour = 'blue'", ["unknown key 'colour'"]),
        ('[attack_kwargs."pgd-linf-v1"]\nstepz = 3', ["unknown kwarg 'stepz' for pgd-linf-v1"]),
        ("n_eval = 100000", ["n_eval = 100000 but digits has only 450 test examples"]),
        ('dataset = "imagenet"', ["unknown dataset 'imagenet'"]),
    ],
)
def test_bad_matrix_specs_are_one_line_errors(tmp_path, toml, fragments):
    config = write_matrix(tmp_path / "bad.toml", toml)
    _one_line_error(run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path), *fragments)
    assert not (tmp_path / "results").exists(), "bad input must fail before anything is written"


def test_missing_config_file(tmp_path):
    _one_line_error(run_cli("run", "--config", str(tmp_path / "nope.toml")), "does not exist")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_bad_device_strings(tiny_config, device):
    _one_line_error(run_cli("run", "--config", str(tiny_config), "--device", device), f"bad device '{device}'")


def test_cuda_requested_without_cuda(tiny_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(run_cli("run", "--config", str(tiny_config), "--device", "cuda"), "CUDA is not available")


def test_foreign_and_unreadable_databases(tmp_path, tiny_config):
    text = tmp_path / "notes.db"
    text.write_text("not a database, just some notes " * 10)
    _one_line_error(run_cli("leaderboard", "--db", str(text), "--out", str(tmp_path)), "not a robustmatrix database")
    other = tmp_path / "other.db"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()
    _one_line_error(
        run_cli("run", "--config", str(tiny_config), "--db", str(other), "--quiet"),
        "SQLite database of another program",
    )
    _one_line_error(run_cli("leaderboard", "--db", str(tmp_path / "missing.db")), "no results database")
    _one_line_error(run_cli("leaderboard", "--db", str(tmp_path)), "is a directory")


def test_missing_data_files_without_download(tmp_path):
    config = write_matrix(tmp_path / "mnist.toml", TINY_MATRIX.replace('"digits"', '"mnist"'))
    result = run_cli("run", "--config", str(config), "--data-dir", str(tmp_path / "empty"), "--no-download", "--quiet")
    _one_line_error(result, "mnist", "is missing from", "put the file there")


def test_unknown_subcommand_and_option_are_one_line_errors():
    _one_line_error(run_cli("frobnicate"), "invalid choice")
    _one_line_error(run_cli("run", "--bogus"), "unrecognized arguments")


@pytest.mark.parametrize(
    "args, fragment",
    [(["run", "--device", "gpu"], "bad device 'gpu'"), (["list", "--kind", "robot"], "invalid choice")],
)
def test_a_real_process_exits_2_without_traceback(tmp_path, args, fragment):
    result = run_cli_subprocess(*args, cwd=tmp_path)
    _one_line_error(result, fragment)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["list", "pgd-lnf-v1"], ["unknown defense or attack 'pgd-lnf-v1'", "pgd-linf-v1 (attack)"]),
        (["list", "pgd-at-linf"], ["did you mean pgd-at-linf-v1 (defense)"]),
        (["list", "zz*"], ["no defense or attack matches 'zz*'"]),
        (["list", "--kind", "defense", "pgd-linf-v1"], ["'pgd-linf-v1' is an attack, not a defense"]),
        (["list", "--dataset", "nosuch"], ["unknown dataset 'nosuch'", "digits"]),
        (["check", "pgd-lnf-v1"], ["unknown defense or attack 'pgd-lnf-v1'", "pgd-linf-v1 (attack)"]),
        (["check", "standard-v1", "--dataset", "nosuch"], ["unknown dataset 'nosuch'"]),
    ],
)
def test_unknown_ids_and_datasets_in_list_and_check(args, fragments):
    _one_line_error(run_cli(*args), *fragments)


def test_list_still_accepts_ids_of_either_kind():
    result = run_cli("list", "pgd-linf-v1", "standard-v1", "--dataset", "mnist")
    assert result.code == 0 and "pgd-linf-v1" in result.stdout and "standard-v1" in result.stdout


def test_bad_output_paths_fail_before_any_work(tmp_path, tiny_config):
    taken = tmp_path / "taken"
    taken.write_text("a file where the leaderboard folder should go")
    _one_line_error(
        run_cli("run", "--config", str(tiny_config), "--out", str(taken), "--quiet", cwd=tmp_path),
        f"--out {taken} is a file, not a folder",
    )
    _one_line_error(
        run_cli("run", "--config", str(tiny_config), "--db", str(taken / "x.db"), "--quiet", cwd=tmp_path),
        f"--db {taken / 'x.db'}",
        "is a file, not a folder",
    )
    _one_line_error(
        run_cli("run", "--config", str(tiny_config), "--db", str(tmp_path), "--quiet", cwd=tmp_path),
        "is a directory",
    )
    _one_line_error(run_cli("nightly", "--config", str(tiny_config), "--out", str(taken), cwd=tmp_path), "--out")
    assert not (tmp_path / "results").exists(), "nothing may be trained or written"


def test_leaderboard_of_a_defense_without_ok_cells_prints_no_matplotlib_warning(tmp_path):
    import warnings

    import numpy as np

    from bench.storage.store import CellRecord, Store
    from tests.leaderboard_data import FakeDefense, write_database

    db = write_database(tmp_path / "r.db", [FakeDefense("broken-v1", {})])
    with Store.open(db) as store:
        store.put_cell(
            CellRecord(
                "broken-v1/0/pgd/0.1", "broken-v1/0", "digits", "broken-v1", "pgd-linf-v1", "v", {}, "gradient",
                "linf", 0.1, True, 0, 100, "failed", "boom", np.ones(100, bool), None, None, 0, 0, 0.0, "cpu", {},
            )
        )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("leaderboard", "--db", str(db), "--out", str(tmp_path / "out"))
    assert result.code == 0, result.stderr
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
