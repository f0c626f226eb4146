"""examples/05_custom_checkpoint.py runs and shows remat's Function matching bitwise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_estimate_llama_example_runs():
    pytest.importorskip("transformers")
    script = EXAMPLE.parent / "06_estimate_llama.py"
    result = subprocess.run(
        [sys.executable, str(script), "--size", "7b", "--seq", "128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "every decoder layer" in result.stdout
    assert re.search(r"checkpointed\s+32 modules", result.stdout), result.stdout


def test_transformers_example_runs_both_recipes_exactly():
    pytest.importorskip("transformers")
    script = EXAMPLE.parent / "07_transformers.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("gradients bitwise equal: True") == 2
    assert "remat.autoplan 50%" in result.stdout and "hf.enable" in result.stdout
