"""``import remat`` stays light: no matplotlib, rich or transformers, and CUDA untouched.

Each check runs in a fresh interpreter, since this test process has imported them already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("matplotlib", "rich", "transformers")

PROBE = """
import json, sys
import {modules}
import torch
print(json.dumps({{
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}),
    "cuda_initialized": torch.cuda.is_initialized(),
}}))
"""


@pytest.mark.parametrize(
    "modules",
    [
        "remat",
        # The command's modules import rich, matplotlib and transformers inside functions.
        "remat.cli, remat.bench.runner, remat.bench.plots, remat.bench.worker, "
        "remat.bench.hf_workloads",
    ],
)
def test_import_is_lean(modules):
    code = PROBE.format(modules=modules, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"import {modules} pulled in {report['heavy']}"
    assert report["cuda_initialized"] is False
