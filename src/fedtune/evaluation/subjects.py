"""MMLU subjects → categories, exactly as the FlowerTune General NLP board scores them.

This is the one place the mapping lives. It equals lm-evaluation-harness's grouping (and not the
original MMLU paper's, which files anatomy under "other"). The board scores three categories;
"other" is available but never part of the Average.
"""

from __future__ import annotations

from collections.abc import Iterable

STEM = "stem"
SOCIAL_SCIENCES = "social_sciences"
HUMANITIES = "humanities"
OTHER = "other"

# The board's column order: STEM, Social Sciences, Humanities.
SCORED_CATEGORIES: tuple[str, ...] = (STEM, SOCIAL_SCIENCES, HUMANITIES)
ALL_CATEGORIES: tuple[str, ...] = (*SCORED_CATEGORIES, OTHER)

# Subject order inside a category is the official evaluator's order (it fixes the order of the
# board's generation files, which rescoring and the prompt-equality test rely on).
CATEGORY_SUBJECTS: dict[str, tuple[str, ...]] = {
    STEM: (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    SOCIAL_SCIENCES: (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    HUMANITIES: (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    OTHER: (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}

# Checked whenever the test split is loaded: 3,153 + 3,077 + 4,705 = 10,935 scored, + 3,107 other =
# 14,042.
EXPECTED_TEST_QUESTIONS: dict[str, int] = {
    STEM: 3153,
    SOCIAL_SCIENCES: 3077,
    HUMANITIES: 4705,
    OTHER: 3107,
}
EXPECTED_TEST_TOTAL = 14042
EXPECTED_SUBJECTS_PER_CATEGORY: dict[str, int] = {
    STEM: 19,
    SOCIAL_SCIENCES: 12,
    HUMANITIES: 13,
    OTHER: 13,
}
DEV_SHOTS_PER_SUBJECT = 5

SUBJECT_CATEGORY: dict[str, str] = {
    subject: category for category, subjects in CATEGORY_SUBJECTS.items() for subject in subjects
}
ALL_SUBJECTS: tuple[str, ...] = tuple(SUBJECT_CATEGORY)


class SubjectError(ValueError):
    """An unknown MMLU subject or category was asked for."""


def category_of(subject: str) -> str:
    """The board category of an MMLU subject.

    Raises:
        SubjectError: the subject is not one of the 57.
    """
    try:
        return SUBJECT_CATEGORY[subject]
    except KeyError:
        raise SubjectError(f"unknown MMLU subject {subject!r}") from None


def resolve_categories(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate category names (a list or a comma-separated string); None → the three scored ones.

    "all" expands to the four categories. The result keeps the board's column order.

    Raises:
        SubjectError: a name that is not a category.
    """
    if names is None:
        return SCORED_CATEGORIES
    if isinstance(names, str):
        names = [part for part in names.split(",")]
    wanted = {name.strip().lower().replace("-", "_").replace(" ", "_") for name in names}
    wanted.discard("")
    if "all" in wanted:
        wanted = (wanted - {"all"}) | set(ALL_CATEGORIES)
    unknown = sorted(wanted - set(ALL_CATEGORIES))
    if unknown:
        raise SubjectError(
            f"unknown MMLU category {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(ALL_CATEGORIES)} or all"
        )
    if not wanted:
        raise SubjectError("no MMLU category given")
    return tuple(category for category in ALL_CATEGORIES if category in wanted)


def resolve_subjects(names: Iterable[str] | str) -> tuple[str, ...]:
    """Validate subject names (a list or comma-separated string), keeping the given order.

    Raises:
        SubjectError: a name that is not an MMLU subject.
    """
    if isinstance(names, str):
        names = names.split(",")
    subjects = [name.strip() for name in names if name.strip()]
    for subject in subjects:
        category_of(subject)
    return tuple(dict.fromkeys(subjects))


def check_mapping() -> None:
    """Assert the mapping's shape: 19/12/13/13 subjects, 57 distinct.

    Raises:
        AssertionError: the data above was edited into an inconsistent state.
    """
    for category, expected in EXPECTED_SUBJECTS_PER_CATEGORY.items():
        count = len(CATEGORY_SUBJECTS[category])
        assert count == expected, f"{category}: {count} subjects, expected {expected}"
    assert len(SUBJECT_CATEGORY) == 57, "a subject is listed in two categories"
