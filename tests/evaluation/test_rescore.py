"""Re-scoring published generation files reproduces the official accuracies to the last digit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.evaluation.rescore import GenerationFileError, rescore_file

# Published FlowerTune generation files and the official scorer's accuracies (see SOURCE.md there).
GENERATIONS = Path(__file__).resolve().parents[1] / "fixtures" / "flowertune-generations"
FILES = sorted(GENERATIONS.glob("*/generation_mmlu_*.jsonl.gz"))


@pytest.mark.skipif(not FILES, reason="published generations not present")
@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}-{p.name[16:-9]}")
def test_rescore_reproduces_the_official_accuracy(path):
    category = path.name[len("generation_mmlu_") : -len(".jsonl.gz")]
    official = (path.parent / f"acc_mmlu_{category}.txt").read_text()
    result = rescore_file(path)
    assert result.official_line() == official
    assert result.category == category


@pytest.mark.skipif(not FILES, reason="published generations not present")
def test_rescore_command(capsys):
    assert main(["eval", "rescore", "--json", *map(str, FILES)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["accuracy"] for r in printed] == [rescore_file(p).accuracy for p in FILES]


def test_json_lines_and_plain_files_are_accepted(tmp_path):
    rows = [
        {"prompt": "p", "gold": "A", "subset": "anatomy", "output": "Answer"},
        {"prompt": "p", "gold": "B", "subset": "anatomy", "output": "The answer is B"},
        {"prompt": "p", "gold": "C", "subset": "virology", "output": "c"},
    ]
    lines = tmp_path / "gen.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = rescore_file(lines)
    assert (result.correct, result.rows, result.category) == (2, 3, None)
    packed = tmp_path / "gen.json.gz"
    packed.write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert rescore_file(packed).accuracy == 2 / 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "non-empty"),
        (b'[{"prompt": "p", "gold": "A", "subset": "anatomy"}]', "string fields"),
        (b'[{"prompt": "p", "gold": "A", "subset": "astrology", "output": ""}]', "astrology"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(GenerationFileError, match=message):
        rescore_file(path)
    assert main(["eval", "rescore", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
