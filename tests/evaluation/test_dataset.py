"""MMLU data: the subject map, the three sources, the count checks and the constant-answer baselines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedtune.evaluation.dataset import (
    DatasetError,
    load_split,
    questions_from_hub_rows,
    read_csv_dir,
    read_hub,
    write_embedded_copy,
)
from fedtune.evaluation.metrics import constant_baselines
from fedtune.evaluation.subjects import (
    CATEGORY_SUBJECTS,
    SubjectError,
    check_mapping,
    resolve_categories,
    resolve_subjects,
)

# The original MMLU CSVs are not vendored (7 MB): point FEDTUNE_MMLU_CSV at a copy, or keep one
# beside the checkout as ../shared/data/mmlu.
SHARED_MMLU = Path(
    os.environ.get("FEDTUNE_MMLU_CSV")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "mmlu"
)
needs_shared = pytest.mark.skipif(not SHARED_MMLU.is_dir(), reason="shared MMLU CSVs not present")


def test_mapping_has_the_boards_shape():
    check_mapping()
    assert [
        len(CATEGORY_SUBJECTS[c]) for c in ("stem", "social_sciences", "humanities", "other")
    ] == [
        19,
        12,
        13,
        13,
    ]
    assert "anatomy" in CATEGORY_SUBJECTS["stem"]  # lm-eval's grouping, not the paper's


def test_embedded_test_split_counts():
    questions = load_split()
    assert len(questions) == 14042
    scored = [q for q in questions if q.category != "other"]
    assert len(scored) == 10935
    counts = {
        c: sum(q.category == c for q in questions)
        for c in ("stem", "social_sciences", "humanities")
    }
    assert counts == {"stem": 3153, "social_sciences": 3077, "humanities": 4705}
    assert [q.answer for q in questions].count("D") == 3776
    assert len(load_split(split="dev")) == 285


@needs_shared
def test_embedded_copy_equals_the_original_csvs(tmp_path):
    for split in ("test", "dev"):
        assert load_split("embedded", split) == load_split(str(SHARED_MMLU), split)
    # and rebuilding the resource from the CSVs gives the shipped bytes
    rebuilt = tmp_path / "mmlu.jsonl.xz"
    assert write_embedded_copy(SHARED_MMLU, rebuilt) == 14327
    shipped = Path(__file__).resolve().parents[2] / "src/fedtune/resources/mmlu/mmlu.jsonl.xz"
    assert rebuilt.read_bytes() == shipped.read_bytes()


@needs_shared
def test_incomplete_csv_directory_is_refused(tmp_path):
    (tmp_path / "test").mkdir()
    shutil.copy(SHARED_MMLU / "test" / "anatomy_test.csv", tmp_path / "test")
    assert len(read_csv_dir(tmp_path, "test")) == 135
    with pytest.raises(DatasetError, match="subjects missing"):
        load_split(str(tmp_path), "test")


def test_unknown_csv_subject_and_bad_answer_are_refused(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "astrology_test.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(SubjectError, match="astrology"):
        read_csv_dir(tmp_path, "test")
    (tmp_path / "test" / "astrology_test.csv").unlink()
    (tmp_path / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(DatasetError, match="answer 'E'"):
        read_csv_dir(tmp_path, "test")


def _write_hub_layout(root: Path, questions) -> None:
    """A local folder laid out like the hub's cais/mmlu: parquet under all/, configs in README.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "all").mkdir(parents=True)
    table = pa.table(
        {
            "question": [q.question for q in questions],
            "subject": [q.subject for q in questions],
            "choices": [list(q.choices) for q in questions],
            "answer": ["ABCD".index(q.answer) for q in questions],
        }
    )
    pq.write_table(table, root / "all" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: all\n  data_files:\n  - split: test\n"
        "    path: all/test-*.parquet\n---\n"
    )


def test_hub_source_reads_a_folder_laid_out_like_cais_mmlu(tmp_path):
    pytest.importorskip("pyarrow")
    everything = load_split()
    _write_hub_layout(tmp_path / "full", everything)
    assert load_split(f"hub:{tmp_path / 'full'}", "test") == everything
    _write_hub_layout(
        tmp_path / "two", [q for q in everything if q.subject in ("anatomy", "virology")]
    )
    assert len(read_hub(str(tmp_path / "two"), "test")) == 135 + 166
    with pytest.raises(DatasetError, match="55 subjects missing"):
        load_split(f"hub:{tmp_path / 'two'}", "test")
    with pytest.raises(DatasetError, match="cannot load MMLU test split"):
        read_hub(str(tmp_path / "absent"), "test")


def test_hub_rows_in_the_wrong_format_are_refused():
    with pytest.raises(DatasetError, match="cais/mmlu"):
        questions_from_hub_rows([{"question": "q", "subject": "anatomy"}], "test")
    with pytest.raises(DatasetError, match="4 choices"):
        questions_from_hub_rows(
            [{"question": "q", "subject": "anatomy", "choices": ["a"], "answer": 0}], "test"
        )


def test_category_and_subject_names_are_validated():
    assert resolve_categories(None) == ("stem", "social_sciences", "humanities")
    assert resolve_categories("humanities,STEM") == ("stem", "humanities")
    assert resolve_categories("all")[-1] == "other"
    with pytest.raises(SubjectError, match="unknown MMLU category 'science'"):
        resolve_categories("science")
    with pytest.raises(SubjectError, match="unknown MMLU subject 'astrology'"):
        resolve_subjects("anatomy,astrology")


def test_constant_answer_baselines_match_the_board():
    """Always answering D scores 27.95 on the board's Average over the full scored test split."""
    scored = [q for q in load_split() if q.category != "other"]
    board = {letter: b["board"]["average"] for letter, b in constant_baselines(scored).items()}
    assert board == {"A": 22.39, "B": 23.94, "C": 25.72, "D": 27.95}
