"""The Ray executor on a real local Ray instance (loopback only, 2 CPUs): a small matrix gives the
same database as the local executor, and the driver alone writes it.

Skipped where Ray is not installed (it is an optional extra); CI installs it."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from bench.execution.ray_executor import LOCAL_ONLY_ENV
from tests.components import components
from tests.conftest import REPO, TINY_MATRIX, run_cli, write_matrix
from tests.test_faults import BROKEN_DEFENSE, FAULTY
from tests.test_runner import snapshot

for _key, _value in LOCAL_ONLY_ENV.items():  # before Ray is imported: it reads them once
    os.environ.setdefault(_key, _value)
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'robustmatrix[ray]'")


def test_the_executor_starts_its_own_loopback_instance_and_stops_it(tmp_path, monkeypatch):
    """Without --address: a new local instance on the loopback interface — even where RAY_ADDRESS
    names a cluster (joining one is --address's job) — shut down again on close."""
    from bench.execution.ray_executor import RayExecutor, WorkerSettings

    assert not ray.is_initialized(), "this test runs before the module's shared instance"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    executor = RayExecutor(
        WorkerSettings("digits", "cpu"), tmp_path, init_kwargs={"num_cpus": 2, "log_to_driver": False}
    )
    try:
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        assert executor.settings.device == "cpu"
    finally:
        executor.close()
    assert not ray.is_initialized()


def test_an_unreachable_cluster_is_a_one_line_error_not_a_hang(tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        result = run_cli("run", "--config", str(config), "--executor", "ray", "--address", address, cwd=tmp_path)
        assert result.code == 2 and f"cannot reach the Ray cluster at {address}" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory) -> Path:
    """A folder of user-written component modules, importable on the workers too."""
    return tmp_path_factory.mktemp("user-modules")


@pytest.fixture(scope="module")
def local_ray(user_modules):
    previous = os.getcwd()
    os.chdir(REPO)  # workers start in the driver's folder and import robustmatrix from it
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(user_modules), str(REPO)])}},
        )
    finally:
        os.chdir(previous)
    yield ray
    ray.shutdown()


def test_a_small_matrix_on_ray_equals_the_local_executor(local_ray, tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    on_ray = run_cli(
        "run", "--config", str(config), "--quiet", "--executor", "ray", "--db", str(tmp_path / "ray" / "r.db"),
        cwd=tmp_path,
    )  # fmt: skip
    assert on_ray.code == 0, on_ray.stderr
    assert "2 defenses trained, 8 cells computed" in on_ray.stderr
    assert len(list((tmp_path / "ray" / "checkpoints").glob("*.pt"))) == 2, "the driver keeps the checkpoints"

    # Both default to one torch thread per job (--cpus-per-task 1): same sums, same bits.
    local = run_cli("run", "--config", str(config), "--quiet", "--db", str(tmp_path / "local" / "r.db"))
    assert local.code == 0, local.stderr
    assert snapshot(tmp_path / "ray" / "r.db") == snapshot(tmp_path / "local" / "r.db")

    again = run_cli("run", "--config", str(config), "--quiet", "--executor", "ray", "--db", str(tmp_path / "ray/r.db"))
    assert again.code == 0 and "0 defenses trained, 0 cells computed, 8 already in" in again.stderr


def test_bad_ray_options_are_one_line_errors(local_ray, tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    for args, fragment in [
        (["--device", "cuda:1"], "Ray assigns GPUs to tasks"),
        (["--device", "cuda"], "the Ray cluster has no GPUs"),
        (["--gpus-per-task", "0"], "--gpus-per-task must be a positive number"),
    ]:
        result = run_cli("run", "--config", str(config), "--executor", "ray", *args, "--db", str(tmp_path / "x.db"))
        assert result.code == 2 and fragment in result.stderr, (args, result.stderr)
    assert not (tmp_path / "x.db").exists()
    local = run_cli("run", "--config", str(config), "--address", "auto", "--db", str(tmp_path / "x.db"))
    assert local.code == 2 and "use it with --executor ray" in local.stderr


def test_faults_on_ray_cost_only_their_own_cells(local_ray, user_modules, tmp_path):
    """A defense that cannot train, cells that raise, return NaN or run past their budget — in
    modules the workers import by name — fail alone, with the same reasons as locally."""
    source = FAULTY + BROKEN_DEFENSE.split("KWARGS, DATASET_KWARGS = with_training_defaults({})", 1)[1]
    with components(user_modules, source):
        config = write_matrix(
            tmp_path / "matrix.toml",
            """
dataset = "digits"
defenses = ["standard-v1", "broken-v1"]
attacks = ["fgsm-linf-v1", "raising-linf-v1", "nan-linf-v1", "stuck-linf-v1"]
n_eval = 60
cell_timeout = 3
[eps]
linf = [0.3]
[defense_kwargs."*"]
epochs = 2
""",
        )
        db = tmp_path / "r.db"
        result = run_cli("run", "--config", str(config), "--quiet", "--executor", "ray", "--db", str(db))
    assert result.code == 1, result.stderr
    assert "4 failure(s); everything else completed" in result.stderr
    assert "broken-v1 (seed 0): none of its cells ran: training failed: RuntimeError: deliberately broken" in (
        result.stderr
    )
    connection = sqlite3.connect(db)
    cells = dict(connection.execute("SELECT attack_id, coalesce(error, status) FROM cells").fetchall())
    connection.close()
    # How many examples the NaN attack saw depends on the trained model (thread count), not on Ray.
    assert re.fullmatch(
        r"NonFiniteResult: NaN/inf in the attack's adversarial examples \((\d+) of \1 examples\)",
        cells.pop("nan-linf-v1"),
    )
    assert cells == {
        "fgsm-linf-v1": "ok",
        "raising-linf-v1": "ValueError: deliberately raising attack",
        "stuck-linf-v1": "timeout: cell exceeded its time budget of 3 s",
    }


@pytest.mark.parametrize(
    "component, fragment",
    [
        ("harness", "the worker's harness (version"),
        ("library:torch", "the worker's library:torch (version"),
        ("defense:standard-v1", "the worker's defense:standard-v1 (version"),
    ],
)
def test_a_worker_with_other_code_than_the_driver_stores_nothing_under_the_drivers_keys(
    local_ray, tmp_path, monkeypatch, component, fragment
):
    """The driver claims other versions than the workers have (as after an upgrade on the driver
    only): every task compares, and the jobs fail with the component named instead of running."""
    import bench.execution.ray_executor as ray_executor

    real = ray_executor.code_versions
    monkeypatch.setattr(ray_executor, "code_versions", lambda job: {**real(job), component: "driver-only"})
    config = write_matrix(tmp_path / "matrix.toml", TINY_MATRIX)
    db = tmp_path / "r.db"
    result = run_cli("run", "--config", str(config), "--quiet", "--executor", "ray", "--db", str(db))
    assert result.code == 1, result.stderr
    assert fragment in result.stderr and "differs from the driver's (driver-only)" in result.stderr
    connection = sqlite3.connect(db)
    try:
        assert connection.execute("SELECT COUNT(*) FROM cells WHERE status = 'ok'").fetchone() == (0,)
    finally:
        connection.close()


def test_a_cell_checks_every_attack_its_cascade_runs(tmp_path):
    from bench.execution.jobs import CellJob, TrainingJob
    from bench.execution.ray_executor import code_versions, version_mismatch

    training = TrainingJob("t" * 32, "standard-v1", {}, "digits", 0, "x.pt")
    cell = CellJob(
        cell_key="c" * 32, training=training, attack_id="adaptive-worst-case-linf-v1", attack_version="v",
        attack_kwargs={}, family="adaptive", norm="linf", eps=0.1, bounded=True, n_eval=10, batch_size=10,
        clean_mask=b"", bpda_fallback=False, surrogate=None, timeout=None, members=(),
        member_versions=(("apgd-ce-linf-v1", "v"), ("square-linf-v1", "v")),
    )  # fmt: skip
    expected = code_versions(cell)
    assert {"attack:adaptive-worst-case-linf-v1", "attack:apgd-ce-linf-v1", "attack:square-linf-v1"} <= set(expected)
    assert version_mismatch(cell, expected) is None
    tampered = {**expected, "attack:square-linf-v1": "other"}
    assert "the worker's attack:square-linf-v1" in version_mismatch(cell, tampered)


class _FakeRay:
    """Records how the executor starts Ray, without starting it."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)

    def cluster_resources(self) -> dict:
        return {"CPU": 1.0}

    def remote(self, function):
        return self

    def options(self, **kwargs):
        return self


def test_address_local_is_the_same_loopback_only_instance_as_no_address(tmp_path, monkeypatch):
    """`--address local` starts a new instance exactly as no address does: bound to 127.0.0.1 (it
    listened on every interface, without authentication, for anyone who could reach the node)."""
    import bench.execution.ray_executor as ray_executor

    started = {}
    for address in (None, "local"):
        fake = _FakeRay()
        monkeypatch.setattr(ray_executor, "import_ray", lambda local, fake=fake: fake)
        ray_executor.RayExecutor(ray_executor.WorkerSettings("digits", "cpu"), tmp_path, address=address)
        (started[address],) = fake.calls
    assert started[None]["_node_ip_address"] == "127.0.0.1" and started[None]["address"] == "local"
    assert started["local"] == started[None]


def test_the_worker_checkpoint_cache_is_private_to_its_user(tmp_path, monkeypatch):
    """The default cache lives in the node's shared temp folder: created 0700 under the user's uid;
    a folder another user owns or may write to is refused in one line, never used."""
    import stat

    from bench.execution.worker import WorkerSettings, private_cache, workbench_for
    from bench.foundation.errors import RobustMatrixError

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    bench = workbench_for(WorkerSettings("digits", "cpu", data_dir=str(tmp_path / "data")))
    folder = tmp_path / f"robustmatrix-ray-{os.getuid()}"
    assert bench.checkpoint_dir == folder / "checkpoints" == private_cache()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    folder.chmod(0o777)
    with pytest.raises(RobustMatrixError, match=r"is writable by others \(mode 777\); chmod 700 it"):
        private_cache()
    folder.chmod(0o700)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)  # the folder is now someone else's
    (tmp_path / f"robustmatrix-ray-{os.getuid()}").mkdir(mode=0o700)
    with pytest.raises(RobustMatrixError, match=r"belongs to another user \(uid \d+\); remove it"):
        private_cache()


def test_a_cached_checkpoint_is_reused_only_when_its_digest_matches(tmp_path):
    """A cached file of the right size but other bytes (a truncated write, someone else's model) is
    replaced by the driver's checkpoint: the cache compares sha256 digests, not sizes."""
    from types import SimpleNamespace

    from bench.execution.jobs import TrainingJob
    from bench.execution.ray_executor import _materialize

    training = TrainingJob("t" * 32, "standard-v1", {}, "digits", 0, "model.pt")
    cached = tmp_path / "model.pt"
    cached.write_bytes(b"planted model!")
    shipped = b"driver's model"
    assert len(shipped) == len(cached.read_bytes())
    _materialize(SimpleNamespace(checkpoint_dir=tmp_path), training, shipped)  # type: ignore[arg-type]
    assert cached.read_bytes() == shipped
    before = cached.stat().st_mtime_ns
    _materialize(SimpleNamespace(checkpoint_dir=tmp_path), training, shipped)  # type: ignore[arg-type]
    assert cached.stat().st_mtime_ns == before, "an identical checkpoint is not written again"


def test_a_cell_stuck_beyond_sigalrm_is_cancelled_by_the_ray_driver(local_ray, user_modules, tmp_path):
    """A task blocked where its own SIGALRM cannot reach it is force-cancelled by the driver once it
    has *run* (not waited in Ray's queue) for cell_timeout + grace, and stored as failed."""
    from tests.test_executor_pool import run_wedged_matrix

    run_wedged_matrix(tmp_path, user_modules, "--executor", "ray")
