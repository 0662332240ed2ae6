"""The example plugin's own test suite runs with ours: the README points researchers at it as the
model to copy, so it must keep passing against today's API (the scaffold's tests are checked in
tests/test_plugins.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "gradient-regularization"


def test_the_example_plugins_tests_pass():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
