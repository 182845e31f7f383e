"""bench/gpu_check.py: the GPU's checks, run here in --dry-run on the CPU so that they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.unit
def test_without_a_gpu_it_asks_for_dry_run_and_refuses_unknown_steps(tmp_path):
    import torch

    if not torch.cuda.is_available():
        done = _run("--json", str(tmp_path / "x.json"))
        assert done.returncode == 2 and "--dry-run" in done.stderr
    done = _run("--dry-run", "--only", "peak,warp", "--json", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "unknown step 'warp'" in done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path, embedded_source):
    out = tmp_path / "gpu_check.json"
    done = _run("--dry-run", "--json", str(out), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert list(steps) == ["peak", "train", "quantized_round", "eval", "default_job"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["peak"]["matmul_gflops"] > 0 and steps["peak"]["dtype"] == "float32"
    runs = steps["train"]["runs"]
    for name in ("fedtune", "fedtune (gradient checkpointing)"):
        assert runs[name]["tokens"] > 0 and runs[name]["fraction_of_peak"] > 0, runs[name]
    trl = runs["TRL SFTTrainer (template, gradient checkpointing)"]
    assert "tokens_per_s" in trl or "trl is not installed" in trl["skipped"]
    assert "needs CUDA" in steps["quantized_round"]["note"]
    for name in ("quantized_round", "default_job"):
        assert steps[name]["rounds"] == 1 and steps[name]["total_bytes"] > 0
    assert steps["eval"]["identical_generations"] is True
    assert steps["eval"]["n_questions"] >= 3
