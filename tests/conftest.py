"""Shared fixtures: an offline, quiet environment; tiny random models built in code; the real tokenizer.

Test tiers (markers declared in pyproject.toml, assigned here at collection):
- `integration`: loads the real embedded model (the `embedded_source` fixture converts and caches it)
  or runs against a real server or engine (the `live_server` fixture, Flower's simulation engine, a
  `fedtune` or `flwr` process). Tests using the fixtures in INTEGRATION_FIXTURES get the marker here;
  the others carry it in their module.
- `slow`: over a minute, or the bulk of the suite's time; marked in the module.
- `unit`: every other test — tiny models built in code and SmolLM2's real tokenizer (read without the
  model's weights). `pytest -m unit` needs no model conversion and no server.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="fedtune-tests-"))

# Nothing in the test suite may reach a hub or phone home, and Flower must not install dependencies.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "UV_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_HOME": str(_TMP / "flwr-home"),
    "RAY_TMPDIR": str(_TMP / "ray"),
    "HF_DATASETS_CACHE": str(_TMP / "hf-datasets"),
}


# A test that uses any of these fixtures (directly or through another fixture) is an integration test.
INTEGRATION_FIXTURES = frozenset({"embedded_source", "live_server"})
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


# With pytest-xdist (scripts/test runs the suite in two worker processes), the tests of a module run
# on one worker, one after another, so that module-scoped fixtures are made once — except in these
# modules, whose tests each start a Flower engine or federation of their own and share only session
# fixtures made once for all workers (tests/federation/conftest.py): each of their tests is handed
# out on its own.
SPREAD_MODULES = frozenset(
    {
        "tests/federation/test_disk.py",
        "tests/federation/test_faults.py",
        "tests/federation/test_resume.py",
        "tests/runtime/test_chain.py",
        "tests/runtime/test_deployment_faults.py",
        "tests/runtime/test_flwr_run.py",
        "tests/runtime/test_simulation.py",
    }
)
# Tests whose assertions ride on timing that another worker's processes could upset (a restarted
# simulation worker back within a retry; health checks answered within 200 ms): with pytest-xdist,
# each runs alone — the other worker waits between two of its own tests — and they come last.
RUN_ALONE = frozenset(
    {
        "tests/federation/test_faults.py::test_bad_replies_are_dropped_with_their_reasons",
        "tests/leaderboard/test_responsive.py::"
        "test_health_checks_answer_within_200_ms_while_heavy_submissions_are_checked",
    }
)
# The folders in OFFLINE_ENV, recorded for pytest-xdist's workers: they inherit the environment of
# the process that started them, and each replaces that process's folders with its own.
_TMP_VARIABLE = "FEDTUNE_TESTS_TMP"


def is_xdist_worker(config: pytest.Config) -> bool:
    """This process is one of pytest-xdist's workers."""
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    inherited = os.environ.get(_TMP_VARIABLE) if is_xdist_worker(config) else None
    for key, value in OFFLINE_ENV.items():
        if inherited and os.environ.get(key, "").startswith(inherited):
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    os.environ[_TMP_VARIABLE] = str(_TMP)
    (_TMP / "ray").mkdir(parents=True, exist_ok=True)
    if is_xdist_worker(config):
        _share_the_cores(int(config.workerinput["workercount"]))


def _share_the_cores(workers: int) -> None:
    """Each pytest-xdist worker's torch (and the processes it starts) uses its share of the cores:
    two workers with a thread per core each would keep twice as many threads as cores busy, and
    torch's threads spin while they wait for one another (a test on the embedded model took ~4x
    as long beside another worker's Flower run). A value set by the user is kept."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tiers: integration by fixture; unit for whatever is neither integration nor slow."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & INTEGRATION_FIXTURES and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(tier) for tier in ("integration", "slow")):
            item.add_marker(pytest.mark.unit)
    if is_xdist_worker(config):
        _schedule_for_workers(items)


def work_unit(nodeid: str) -> str:
    """What pytest-xdist hands to one worker as a whole: a test of SPREAD_MODULES or RUN_ALONE,
    else a module."""
    module = nodeid.split("::", 1)[0]
    return nodeid if module in SPREAD_MODULES or nodeid in RUN_ALONE else module


def _schedule_for_workers(items: list[pytest.Item]) -> None:
    """Order the work units heaviest first — a slow test weighs 100 (as does a test of
    SPREAD_MODULES), an integration test 3, a unit test 1 — so that the long tests start early and
    the short ones fill the gaps at the end. The workers report this order; the scheduler below
    hands the units out in it."""
    weights: dict[str, int] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        slow = unit == item.nodeid or item.get_closest_marker("slow")
        weight = 100 if slow else 3 if item.get_closest_marker("integration") else 1
        weights[unit] = weights.get(unit, 0) + weight
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(work_unit(item.nodeid), index)
    items.sort(
        key=lambda item: (
            item.nodeid in RUN_ALONE,
            -weights[work_unit(item.nodeid)],
            first[work_unit(item.nodeid)],
        )
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """With pytest-xdist, a test of RUN_ALONE holds a lock that every other test shares: it starts
    once the other worker's test has ended, and the other worker starts no test until it is done.
    (Setup and teardown included, so no session fixture is made meanwhile either.)"""
    if not is_xdist_worker(item.config):
        return (yield)
    folder = Path(item.config.option.basetemp).parent  # the session's, above the workers'
    with open(folder / "run-alone.gate", "a") as gate, open(folder / "run-alone.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)  # the gate: while a RUN_ALONE test waits, no test starts
        fcntl.flock(lock, fcntl.LOCK_EX if item.nodeid in RUN_ALONE else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's default `--dist load`, in work units (`work_unit`), in the workers' order."""
    if config.getvalue("dist") != "load":
        return None  # another --dist asked for by name
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order the workers collected
    return WorkUnitScheduling(config, log)


@pytest.fixture(autouse=True)
def _unit_tests_leave_the_embedded_model_alone(request, monkeypatch):
    """In a unit test, converting or loading the embedded model fails the test, naming the cure."""
    if request.node.get_closest_marker("unit") is None:
        return
    import fedtune.model.loading as loading

    def refuse(source, progress=None):
        raise AssertionError(
            f"a unit test converts or loads {source.name}: use a tiny model, or mark the test "
            "integration (tests/conftest.py explains the tiers)"
        )

    monkeypatch.setattr(loading, "ensure_embedded_cache", refuse)


@pytest.fixture(scope="session")
def embedded_source():
    """The embedded SmolLM2 model source (converted to safetensors once, cached in FEDTUNE_CACHE)."""
    from fedtune.model.loading import ensure_embedded_cache, resolve_model

    source = resolve_model(EMBEDDED_MODEL)
    ensure_embedded_cache(source)
    return source


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """A folder with SmolLM2's tokenizer files, without converting or loading the model's weights.

    The converted model's folder where it is cached already; otherwise the tokenizer is read from the
    GGUF file alone (~7 s) and saved for this session — the same files the conversion writes.
    """
    from transformers import AutoTokenizer

    from fedtune.model.loading import EMBEDDED_PREFIX, _embedded_gguf, resolve_model

    converted = Path(resolve_model(EMBEDDED_MODEL).path)
    if (converted / "fedtune-conversion.json").is_file():
        return converted
    target = _TMP / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        gguf = _embedded_gguf(EMBEDDED_MODEL[len(EMBEDDED_PREFIX) :])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    """SmolLM2's real BPE tokenizer (49,152 tokens), loaded as fedtune loads the embedded model's."""
    from fedtune.model.loading import ModelSource, load_tokenizer

    folder = str(smollm2_tokenizer_dir)
    return load_tokenizer(ModelSource("local", folder, folder))


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama with SmolLM2's layout at toy width."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    """Factory fixture: tiny_llama(**overrides) → a fresh random tiny Llama."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """`tiny_llama` for module- and session-scoped fixtures."""
    return build_tiny_llama


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    """A local Hugging Face directory holding a tiny random Llama and SmolLM2's tokenizer."""
    model = build_tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def task_identity():
    """Messages made outside a Flower run need the ids Flower sets in its processes."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
