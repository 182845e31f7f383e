"""The test tiers hold: `pytest -m unit` never converts or loads the embedded model, nor starts a server.

Collects the whole suite in a separate pytest process with `-m unit` and a small plugin that records,
for every test, its markers and fixtures, and whether `-m unit` selected it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

RECORDER = """
import json, os

_rows = {}

def _row(item, selected):
    return {
        "markers": sorted({m.name for m in item.iter_markers()}),
        "fixtures": sorted(getattr(item, "fixturenames", ())),
        "selected": selected,
    }

def pytest_deselected(items):
    for item in items:
        _rows[item.nodeid] = _row(item, False)

def pytest_collection_finish(session):
    for item in session.items:
        _rows[item.nodeid] = _row(item, True)
    with open(os.environ["FEDTUNE_MARKERS_OUT"], "w") as handle:
        json.dump(_rows, handle)
"""


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> dict[str, dict]:
    """Every test of the suite: {node id: {"markers", "fixtures", "selected" (by -m unit)}}."""
    tmp_path = tmp_path_factory.mktemp("markers")
    (tmp_path / "marker_recorder.py").write_text(RECORDER)
    out = tmp_path / "items.json"
    env = {
        **os.environ,
        "FEDTUNE_MARKERS_OUT": str(out),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "unit"]
    command += ["-p", "marker_recorder", "-p", "no:cacheprovider", str(TESTS)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_unit_tier_never_needs_the_embedded_model_or_a_server(items):
    assert len(items) > 100
    unit = {node for node, row in items.items() if "unit" in row["markers"]}
    selected = {node for node, row in items.items() if row["selected"]}
    assert unit == selected and unit, "-m unit selects exactly the tests marked unit"
    for node, row in items.items():
        tiers = {"unit", "integration", "slow"} & set(row["markers"])
        assert ("unit" in tiers) != bool(tiers - {"unit"}), f"{node}: tiers {sorted(tiers)}"
    heavy = {"embedded_source", "live_server"}
    offenders = sorted(n for n in unit if heavy & set(items[n]["fixtures"]))
    assert not offenders, f"unit tests that load the embedded model or start a server: {offenders}"
    # The fixtures that used to pull in the embedded model give unit tests the real tokenizer only.
    users = [n for n in unit if "smollm2_tokenizer" in items[n]["fixtures"]]
    assert users, "no unit test uses SmolLM2's tokenizer"
    assert all("embedded_source" not in items[n]["fixtures"] for n in users)


def test_heavy_modules_are_not_unit(items):
    def markers_of(prefix: str) -> list[set[str]]:
        found = [set(row["markers"]) for node, row in items.items() if node.startswith(prefix)]
        assert found, f"no tests collected from {prefix}"
        return found

    for markers in markers_of("tests/evaluation/test_embedded_model.py"):
        assert {"integration", "slow"} <= markers
    engines = ["tests/runtime/test_simulation.py", "tests/runtime/test_flwr_run.py"]
    for module in (m for m in engines if (ROOT / m).exists()):
        for markers in markers_of(module):
            assert "integration" in markers and "unit" not in markers
    for markers in markers_of("tests/leaderboard/test_serve.py"):
        assert "integration" in markers
