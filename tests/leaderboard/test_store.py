"""The SQLite store: migrations, round trips, duplicates, statuses, tokens, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from fedtune.leaderboard.published import PUBLISHED_ROWS
from fedtune.leaderboard.store import (
    DB_NAME,
    SCHEMA_VERSION,
    DuplicateEntry,
    Store,
    StoreError,
    _insert,
    default_data_dir,
)
from fedtune.leaderboard.validation import validate_submission


def test_fresh_store_holds_the_published_board(store):
    assert store.schema_version() == SCHEMA_VERSION == 6
    entries = store.entries()
    assert len(entries) == 19
    assert all(e.status == "published" and e.track == "general-nlp" for e in entries)
    first = entries[0]
    assert (first.team, first.base_model, first.board_gb, first.average) == (
        "ZeroOne.AI",
        "Internlm3-8b-instruct",
        "2.9 GB",
        69.25,
    )
    assert first.date == "2026-01-14"
    # Every published GB value prints back exactly as published.
    assert [e.board_gb for e in entries] == [f"{row[3]:.1f} GB" for row in PUBLISHED_ROWS]


def test_reopening_does_not_import_twice(store):
    again = Store(store.path)
    assert again.count() == 19


def test_migration_from_version_1_keeps_data(tmp_path, submission):
    path = tmp_path / DB_NAME
    old = Store(path, migrate=False)
    old.migrate(target=1)  # a file written before the published rows were imported
    assert old.schema_version() == 1 and old.count() == 0
    with old.write() as db:  # what that fedtune wrote: an entry and a token, no audit log
        entry_id = _insert(db, validate_submission(submission("early bird")), "early")
        db.execute("INSERT INTO tokens VALUES ('abc', 'early', '2026-01-01T00:00:00Z')")
    upgraded = Store(path)
    assert upgraded.schema_version() == SCHEMA_VERSION
    assert upgraded.count() == 20
    early = upgraded.get(entry_id)
    assert early.team == "early bird" and early.moderation == "shown"
    assert upgraded.tokens()[0]["name"] == "early" and upgraded.tokens()[0]["revoked_at"] is None
    assert upgraded.audit_log() == []
    assert upgraded.generations(entry_id) == {}  # the table of held files exists, empty


def test_migration_5_unranks_what_the_board_cannot_verify(tmp_path, submission):
    import dataclasses

    path = tmp_path / DB_NAME
    old = Store(path, migrate=False)
    old.migrate(target=4)
    entry = validate_submission(submission("Once ranked"))
    with old.write() as db:  # stored by an older fedtune as re-scored and as verified
        ids = [
            _insert(db, dataclasses.replace(entry, status=s), s) for s in ("re-scored", "verified")
        ]
    upgraded = Store(path)
    assert upgraded.schema_version() == SCHEMA_VERSION
    for entry_id in ids:
        moved = upgraded.get(entry_id)
        assert moved.status == "submitted" and not moved.ranked
        assert "holds no adapter" in moved.details["verification"]["reason"]
    assert upgraded.base_models() == {"SmolLM2-135M-Instruct": "embedded:smollm2-135m-instruct"}
    assert upgraded.policy().sample_per_category == 100
    assert all(e.status == "published" for e in upgraded.entries() if e.id not in ids)


def test_adapters_are_held_by_sha256_within_the_cap(store):
    import hashlib

    content = bytes(range(256)) * 5000  # 1.28 MB, written and read in 1 MiB chunks
    sha = hashlib.sha256(content).hexdigest()
    with pytest.raises(StoreError, match="sha256"):
        store.put_adapter(content, "0" * 64, "tests")
    assert store.adapter_size("0" * 64) is None  # the refused upload left nothing
    assert store.put_adapter(content, sha, "tests") is True
    assert store.put_adapter(content, sha, "tests") is False  # held already
    assert store.adapter_size(sha) == len(content)
    assert b"".join(store.read_adapter(sha)) == content
    store.set_policy("max-adapter-mib", "1")
    with pytest.raises(StoreError, match="at most"):
        store.put_adapter(content + b"x", hashlib.sha256(content + b"x").hexdigest(), "tests")


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / DB_NAME
    Store(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_round_trip_and_duplicates(store, submission):
    entry = validate_submission(submission("Round Trip", comm_bytes=123_456_789))
    entry_id = store.add(entry)
    back = store.get(entry_id)
    assert back.team == "Round Trip" and back.comm_bytes == 123_456_789
    assert back.details["evaluation"]["subjects"] == entry.details["evaluation"]["subjects"]
    assert back.average == pytest.approx(entry.average, abs=1e-12)
    with pytest.raises(DuplicateEntry) as info:
        store.add(entry)
    assert info.value.existing_id == entry_id
    assert store.count() == 20
    assert store.get(10_000) is None


def test_tokens_are_stored_hashed(store):
    token = store.new_token("team-x")
    assert store.token_owner(token).startswith("team-x (")
    assert store.token_owner(token + "x") is None
    with store.connect() as db:
        stored = [row[0] for row in db.execute("SELECT token_sha256 FROM tokens")]
    assert token not in stored


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDTUNE_LEADERBOARD_DIR", str(tmp_path / "lb"))
    assert default_data_dir() == tmp_path / "lb"
    assert Store.in_dir().path == tmp_path / "lb" / DB_NAME


def _writer(args: tuple[str, int, int]) -> list[int]:
    """One process: open the store (racing the others' migration) and add entries."""
    from .lb_submissions import make_submission

    path, worker, count = args
    store = Store(path)
    ids = []
    for i in range(count):
        payload = make_submission(
            f"proc {worker} entry {i}", correct=(1000 + i, 1000 + worker, 900)
        )
        ids.append(store.add(validate_submission(payload)))
    return ids


def test_concurrent_writer_processes(tmp_path):
    # Four processes open a *new* file at once (all racing to migrate it) and write 15 entries each.
    path = str(tmp_path / DB_NAME)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(_writer, [(path, w, 15) for w in range(4)])
    ids = [i for chunk in results for i in chunk]
    assert len(ids) == len(set(ids)) == 60
    store = Store(path)
    assert store.count() == 19 + 60  # the published rows imported exactly once
    teams = [e.team for e in store.entries() if e.status == "submitted"]
    assert sorted(teams) == sorted(f"proc {w} entry {i}" for w in range(4) for i in range(15))


def test_published_rows_link_to_their_teams_code_where_known(tmp_path):
    from fedtune.leaderboard.published import BOARD_URL, CODE_URLS

    store = Store(tmp_path / DB_NAME)
    links = {e.details["published_rank"]: e.code_url for e in store.entries()}
    assert links[1].startswith("https://github.com/0-1-ai/")
    assert links[8] == BOARD_URL  # no public repository known
    assert {rank for rank, url in links.items() if url != BOARD_URL} == set(CODE_URLS)
    # A store made before the links were known gets them when it is migrated.
    old_path = tmp_path / "old" / DB_NAME
    old = Store(old_path, migrate=False)
    old.migrate(target=2)
    with old.write() as db:
        db.execute("UPDATE entries SET code_url = ?", (BOARD_URL,))
    migrated = {e.details["published_rank"]: e.code_url for e in Store(old_path).entries()}
    assert migrated == links


def test_migration_6_corrects_the_epsilon_of_sampled_dp_entries(tmp_path, submission):
    import dataclasses
    from types import SimpleNamespace

    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    from fedtune.federation.privacy import privacy_spent
    from fedtune.leaderboard.web.pages import entry_page

    def replace_one(multiplier: float) -> float:  # 2 of 20 clients a round, 3 rounds
        ledger = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        ledger.compose(
            dp_event.SampledWithoutReplacementDpEvent(20, 2, dp_event.GaussianDpEvent(multiplier)),
            3,
        )
        return float(ledger.get_epsilon(1e-5))

    path = tmp_path / DB_NAME
    old = Store(path, migrate=False)
    old.migrate(target=5)
    ids = {}
    with old.write() as db:  # what an older fedtune stored: ε of the multiplier σ, not σ/2
        for accounting in ("without-replacement", "no-amplification"):
            dp = SimpleNamespace(noise="server", noise_multiplier=1.0, clipping_norm=0.1,
                                 delta=1e-5, accounting=accounting)  # fmt: skip
            payload = submission(f"DP {accounting}", rounds=3)
            payload["setup"]["privacy"] = {
                **vars(dp), "releases": [2, 2, 2],
                "epsilon": privacy_spent(dp, 20, [2, 2, 2])["epsilon"],
            }  # fmt: skip
            entry = validate_submission(payload)
            if accounting == "without-replacement":
                entry.details["setup"]["privacy"]["epsilon"] = replace_one(1.0)
            ids[accounting] = _insert(db, dataclasses.replace(entry), accounting)
    stale = old.get(ids["without-replacement"]).details["setup"]["privacy"]["epsilon"]
    kept = old.get(ids["no-amplification"]).details["setup"]["privacy"]
    upgraded = Store(path)
    assert upgraded.schema_version() == SCHEMA_VERSION
    corrected = upgraded.get(ids["without-replacement"]).details["setup"]["privacy"]
    assert corrected["epsilon"] == pytest.approx(replace_one(0.5), rel=1e-9)
    assert corrected["epsilon"] > 2 * stale
    assert corrected["epsilon_before_correction"] == stale and "2C" in corrected["correction"]
    assert upgraded.get(ids["no-amplification"]).details["setup"]["privacy"] == kept
    log = upgraded.audit_log()
    assert [(r["action"], r["entry_id"]) for r in log] == [
        ("epsilon corrected", ids["without-replacement"])
    ]
    assert log[0]["detail"]["epsilon_before"] == stale
    page = entry_page(upgraded.get(ids["without-replacement"]), None, [])
    assert f"epsilon={corrected['epsilon']}" in page and "epsilon_before_correction" in page
