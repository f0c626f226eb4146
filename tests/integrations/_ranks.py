"""Launch one worker process per rank of a gloo group and collect what each saved: the
launcher the distributed tests share (``_dist_worker.py``, ``_tp_worker.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_ranks(script: Path, world: int, out: Path, timeout_s: int, *extra: str) -> list[dict]:
    """``python script RANK WORLD OUT/init OUT *extra`` for every rank, one thread each (the
    ranks share the machine's cores); each rank's ``OUT/rank{RANK}.pt``. Skips without gloo;
    fails on a timeout or a rank's non-zero exit, with its log."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(world),
                str(out / "init"),
                str(out),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{script.name}: the ranks did not finish in {timeout_s} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
