"""The GPU benchmark script runs end to end in Pallas interpret mode on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pallas_gpu.py"


def test_pallas_gpu_script_interpret(tmp_path):
    output = tmp_path / "pallas_gpu.json"
    command = [sys.executable, str(SCRIPT), "--interpret", "--size", "256", "--batches", "1", "3",
               "--repeats", "2", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = json.loads(output.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert "error" not in row, row
        assert row["int4_seconds"] > 0
        assert row["bf16_seconds"] > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="with an accelerator the script runs in full")
def test_pallas_gpu_script_rejects_cpu():
    completed = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert completed.returncode != 0
    assert "no GPU found" in completed.stderr
    assert "Traceback" not in completed.stderr
