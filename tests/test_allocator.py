"""The host-allocator thresholds: freed activations stay mapped (fewer page faults) and no value changes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's (Linux)")

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from bench.foundation.allocator import keep_freed_memory
    from bench.foundation.models import build_model

    tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("digits", (1, 8, 8), 10)
    x = torch.rand(250, 1, 8, 8, requires_grad=True)
    for _ in range(3):  # warm up: torch's and mkldnn's own first-use allocations
        model(x).sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        logits = model(x)
        gradient, = torch.autograd.grad(logits[:, 0].sum(), x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"tuned": tuned, "faults": faults, "logits": logits.tolist(), "gradient": gradient.tolist()}))
    """
)


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_freed_activations_stay_mapped_and_values_are_bit_identical() -> None:
    default, tuned = _run("default"), _run("tuned")
    assert tuned["tuned"] is True
    # 20 forward+backward passes at batch 250: by default every multi-MiB activation is mapped anew
    # (thousands of page faults); with the thresholds the pages of the first pass are reused.
    assert default["faults"] > 2000
    assert tuned["faults"] < default["faults"] / 10
    assert tuned["logits"] == default["logits"]
    assert tuned["gradient"] == default["gradient"]


def test_setting_twice_is_harmless() -> None:
    from bench.foundation.allocator import keep_freed_memory

    assert keep_freed_memory() == keep_freed_memory()
