"""examples/05_custom_checkpoint.py runs and shows remat's Function matching bitwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "05_custom_checkpoint.py"


def test_custom_checkpoint_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--batch", "64"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    block1 = next(line for line in lines if line.startswith("block1.0.weight"))
    assert "NO GRADIENT" in block1 and block1.rstrip().endswith("equal")
    assert "left 8 of 12 parameters without a gradient" in result.stdout
