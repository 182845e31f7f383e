"""Operators' tools: hide, reject, delete, approve and requeue, policy, base models, tokens, the append-only audit log, backups."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from fedtune.cli import main
from fedtune.leaderboard.store import Store, StoreError
from fedtune.leaderboard.validation import validate_submission


def _add(store, team, actor="tests"):
    from .lb_submissions import make_submission

    return store.add(validate_submission(make_submission(team)), actor=actor)


def test_moderation_takes_entries_off_the_ranking_and_is_audited(store):
    hidden, rejected, kept = (_add(store, t) for t in ("Hidden", "Rejected", "Kept"))
    store.moderate(hidden, "hidden", "", actor="ana")
    store.moderate(rejected, "rejected", "scores not reproducible", actor="ana")
    shown = {e.team for e in store.entries()}
    assert "Kept" in shown and not shown & {"Hidden", "Rejected"}
    assert {e.team for e in store.entries(moderated=True)} >= {"Hidden", "Rejected", "Kept"}
    assert store.get(rejected).moderation_reason == "scores not reproducible"
    with pytest.raises(StoreError, match="needs a reason"):
        store.moderate(kept, "rejected", "  ", actor="ana")
    with pytest.raises(StoreError, match="no entry"):
        store.moderate(10**6, "hidden", "", actor="ana")
    store.moderate(hidden, "shown", "", actor="bo")
    assert "Hidden" in {e.team for e in store.entries()}
    log = store.audit_log()
    assert [(r["action"], r["actor"], r["entry_id"]) for r in log[:3]] == [
        ("show", "bo", hidden),
        ("reject", "ana", rejected),
        ("hide", "ana", hidden),
    ]
    assert log[1]["detail"]["reason"] == "scores not reproducible"
    assert {r["action"] for r in store.audit_log(entry_id=kept)} == {"submit"}


def test_delete_keeps_a_copy_in_the_append_only_audit_log(store):
    entry_id = _add(store, "Gone")
    with pytest.raises(StoreError, match="needs a reason"):
        store.delete(entry_id, "", actor="ana")
    store.delete(entry_id, "spam", actor="ana")
    assert store.get(entry_id) is None
    record = store.audit_log(1)[0]
    assert record["action"] == "delete" and record["detail"]["entry"]["team"] == "Gone"
    with sqlite3.connect(store.path) as db:
        for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)


def test_held_for_review_until_an_operator_approves(store):
    from .lb_submissions import admit, honest_answers, make_submission

    # A ceiling below this entry's Average: reproduced, but held for an operator.
    store.set_policy("ceiling.open", "40", actor="ana")
    checked = validate_submission_checked(make_submission("High", correct=(2000, 2000, 3000),
                                                          generations=True))  # fmt: skip
    entry_id = admit(store, checked)
    entry = store.get(entry_id)
    assert entry.status == "held for review" and not entry.ranked
    assert entry.details["verification"]["ceiling"] == 40.0
    with pytest.raises(StoreError, match="not held for review"):
        store.approve(1, actor="ana")
    store.approve(entry_id, actor="ana", reason="looked at the code")
    assert store.get(entry_id).status == "reproduced" and store.get(entry_id).ranked
    # Verified again on an operator's doubt: unranked until the new verdict, same sample.
    store.requeue(entry_id, actor="ana", reason="second look")
    assert store.get(entry_id).status == "pending"
    # Its base model taken off the list: no verifier gets it until it is back.
    store.set_base_model("SmolLM2-135M-Instruct", None, actor="ana")
    assert store.claim_verification("w2") is None
    assert store.set_base_model("SmolLM2-135M-Instruct", "embedded:smollm2-135m-instruct") == 0
    job = store.claim_verification("w2")
    assert job["entry_id"] == entry_id and job["attempt"] == 2
    store.finish_verification(entry_id, job["lease"], honest_answers(store, job, flip=30), {})
    failed = store.get(entry_id)
    assert failed.status == "failed verification" and not failed.ranked
    assert failed.details["verification"]["agreed"] == 270
    actions = [r["action"] for r in store.audit_log(6)]
    assert actions == ["verification", "claim", "base-model", "base-model-remove", "requeue",
                       "approve"]  # fmt: skip


def test_a_verification_every_worker_loses_stalls_until_an_operator_requeues_it(store, capsys):
    from .lb_submissions import admit, honest_answers, make_submission

    store.set_policy("max-attempts", "2", actor="ana")
    checked = validate_submission_checked(make_submission("Crashy", generations=True))
    entry_id = admit(store, checked, reproduce=False)

    def lose_lease() -> None:  # the worker died: its lease runs out without a word from it
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE verifications SET lease_expires = 0 WHERE entry_id = ?", (entry_id,))

    for attempt in (1, 2):
        job = store.claim_verification(f"w{attempt}")
        assert job["entry_id"] == entry_id and job["attempt"] == attempt
        assert store.verification(entry_id)["state"] == "running"
        lose_lease()
    assert store.claim_verification("w3") is None  # not handed out a third time
    assert store.verification(entry_id)["state"] == "stalled"
    assert [(q["entry_id"], q["state"], q["attempts"]) for q in store.queue()] == [
        (entry_id, "stalled", 2)
    ]
    assert store.get(entry_id).status == "pending" and not store.get(entry_id).ranked
    assert main(["leaderboard", "queue", "--data-dir", str(store.path.parent)]) == 0
    printed = capsys.readouterr().out
    assert f"entry {entry_id} Crashy: stalled, attempt 2" in printed
    assert f"stalled (every worker that took them lost them): {entry_id};" in printed
    # The operator's requeue gives it one more try, and an honest worker finishes it.
    store.requeue(entry_id, actor="ana", reason="verifier fixed")
    job = store.claim_verification("w4")
    assert job["attempt"] == 3
    store.finish_verification(entry_id, job["lease"], honest_answers(store, job), {})
    assert store.get(entry_id).status == "reproduced" and store.queue() == []


def validate_submission_checked(payload):
    from fedtune.leaderboard.validation import check_submission

    return check_submission(payload)


def test_tokens_are_listed_and_revoked(store):
    token = store.new_token("team-x", actor="ana")
    assert store.token_owner(token).startswith("team-x (")
    listed = [t for t in store.tokens() if t["name"] == "team-x"]
    assert listed and listed[0]["revoked_at"] is None and token not in json.dumps(listed)
    assert store.revoke_token("team-x", actor="ana") == 1
    assert store.token_owner(token) is None
    with pytest.raises(StoreError, match="no live token"):
        store.revoke_token("team-x", actor="ana")
    assert [r["action"] for r in store.audit_log(2)] == ["revoke", "token"]


def test_backup_and_restore(store, tmp_path):
    entry_id = _add(store, "Precious")
    with store.connect() as reader:  # a backup is taken while the database is in use
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM entries").fetchone()
        copy = store.backup(tmp_path / "backup.sqlite3", actor="ana")
        reader.execute("COMMIT")
    with pytest.raises(StoreError, match="exists"):
        store.backup(copy, actor="ana")
    store.delete(entry_id, "oops", actor="ana")
    store.restore(copy, actor="ana")
    assert store.get(entry_id).team == "Precious"
    assert store.audit_log(1)[0]["action"] == "restore"
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a leaderboard database"):
        store.restore(junk, actor="ana")
    assert Store(store.path).get(entry_id).team == "Precious"  # a refused restore changes nothing


def test_the_web_app_respects_moderation_and_revocation(live_server, submission):
    store = live_server.store
    hidden, rejected = _add(store, "Hidden One"), _add(store, "Rejected One")
    store.moderate(hidden, "hidden", "", actor="ana")
    store.moderate(rejected, "rejected", "claims cannot be checked", actor="ana")
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        teams = {r.get("team") for r in client.get("/api/entries").json()["rows"]}
        assert not teams & {"Hidden One", "Rejected One"}
        assert client.get(f"/entry/{hidden}").status_code == 404
        assert client.get(f"/api/entries/{hidden}").status_code == 404
        page = client.get(f"/entry/{rejected}")
        assert page.status_code == 200
        assert "claims cannot be checked" in page.text and "not ranked" in page.text
        api = client.get(f"/api/entries/{rejected}").json()
        assert api["rank"] is None and api["moderation"] == "rejected"
        assert "Hidden One" not in client.get("/").text
        store.revoke_token("tests", actor="ana")
        reply = client.post(
            "/api/entries",
            json=submission("After Revocation"),
            headers={"Authorization": f"Bearer {live_server.token}"},
        )
        assert reply.status_code == 401


def test_operator_commands(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "lb"), "--actor", "ana"]
    store = Store.in_dir(tmp_path / "lb")
    entry_id = _add(store, "Via CLI")
    with pytest.raises(SystemExit):  # --reason is required
        main(["leaderboard", "reject", str(entry_id), *data])
    capsys.readouterr()
    assert main(["leaderboard", "reject", str(entry_id), "--reason", "no code", *data]) == 0
    assert main(["leaderboard", "unhide", str(entry_id), *data]) == 0
    assert main(["leaderboard", "hide", str(entry_id), *data]) == 0
    assert main(["leaderboard", "approve", str(entry_id), *data]) == 2  # not held for review
    assert main(["leaderboard", "requeue", str(entry_id), "--reason", "x", *data]) == 2
    assert main(["leaderboard", "policy", "set", "sample-per-category", "50", *data]) == 0
    assert main(["leaderboard", "policy", "set", "sample-per-category", "0", *data]) == 2
    assert main(["leaderboard", "policy", "set", "no-such-key", "1", *data]) == 2
    assert main(["leaderboard", "models", "add", "Tiny", "/models/tiny", *data]) == 0
    assert main(["leaderboard", "queue", *data]) == 0
    assert main(["leaderboard", "models", "remove", "Nope", *data]) == 2
    assert main(["leaderboard", "token", "someone", "--data-dir", str(tmp_path / "lb")]) == 0
    assert main(["leaderboard", "revoke", "someone", *data]) == 0
    assert main(["leaderboard", "revoke", "nobody", *data]) == 2
    assert main(["leaderboard", "backup", str(tmp_path / "b.sqlite3"), *data]) == 0
    assert main(["leaderboard", "delete", str(entry_id), "--reason", "test", *data]) == 0
    assert main(["leaderboard", "restore", str(tmp_path / "b.sqlite3"), *data]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "tokens", *data]) == 0
    assert "someone" in capsys.readouterr().out
    assert main(["leaderboard", "audit", "--limit", "20", *data]) == 0
    actions = [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()]
    assert actions[:3] == ["restore", "delete", "backup"]  # a restore does not rewind the log
    assert {"reject", "show", "hide", "policy", "base-model", "token", "revoke"} <= set(actions)
    assert store.get(entry_id).moderation == "hidden"  # restored as it was at the backup


def test_a_token_is_one_team_and_names_that_look_alike_are_refused(live_server, submission):
    store = live_server.store

    def post(team, token, **kw):
        with httpx.Client(base_url=live_server.url, timeout=30) as client:
            return client.post(
                "/api/entries",
                json=submission(team, **kw),
                headers={"Authorization": f"Bearer {token}"},
            )

    first = store.new_token("alice")
    assert post("Alice Lab", first).status_code == 201  # binds the token to "Alice Lab"
    assert post("Alice Lab", first, correct=(1000, 1000, 1000)).status_code == 201
    reply = post("Someone Else", first)
    assert reply.status_code == 403 and "submits for team 'Alice Lab'" in reply.json()["error"]
    bound = store.new_token("bob", team="Bob Co")
    assert post("Not Bob", bound).status_code == 403
    assert post("Bob Co", bound).status_code == 201
    # Another token — even one issued under the same name — cannot submit as Alice Lab.
    reply = post("Alice Lab", store.new_token("alice"), correct=(1200, 1000, 1000))
    assert reply.status_code == 409 and "another submitter" in reply.json()["error"]
    # Copies of a published team's name: exact, Cyrillic look-alike, case, full-width.
    for fake in ("ZeroOne.AI", "Z\u0435roOne.AI", "zeroone.ai", "ＺｅｒｏＯｎｅ.AI"):
        reply = post(fake, store.new_token("mallory"))
        assert reply.status_code == 409, (fake, reply.text)
        assert "ZeroOne.AI" in reply.json()["error"]
    reply = post("Zero\u200bOne.AI", store.new_token("mallory"))  # refused before any lookup
    assert reply.status_code == 422 and "U+200B" in reply.json()["error"]
    assert next(t for t in store.tokens() if t["name"] == "alice")["team"] == "Alice Lab"


def test_team_folding():
    from fedtune.leaderboard.store import fold_team, team_collision

    assert fold_team("  Zero\u200bOne\u00a0 AI ") == "zeroone ai"
    assert fold_team("ｆｅｄｔｕｎｅ") == "fedtune"  # NFKC: full-width letters
    assert team_collision("Team B", ["Team A", "Team B"]) is None
    assert team_collision("T\u0435am A", ["Team A"]) == "Team A"
    assert team_collision("TNl", ["TNI"]) == "TNI"  # l and I are confusable
    # NFKC turns both fillers into U+1160, itself default-ignorable: removed after NFKC too.
    assert fold_team("A\uffa0") == fold_team("A\u3164") == "a"
    # The combining grapheme joiner would keep é from composing: removed before NFKC.
    assert fold_team("Caf\u00e9") == fold_team("Cafe\u034f\u0301") == "caf\u00e9"
    # A stored name from before names were checked for invisible characters still collides.
    assert team_collision("ZeroOne.AI", ["ZeroOne.AI\ufe0f"]) == "ZeroOne.AI\ufe0f"
    assert team_collision("Zero One.AI", ["ZeroOne.AI"]) is None  # a visible space stays


# Unicode's Default_Ignorable_Code_Point, as DerivedCoreProperties.txt lists it (unchanged from
# Unicode 14 to 16; 4,174 code points), declared here apart from the code, which takes it from
# the `regex` module.
DEFAULT_IGNORABLE = [
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
]  # fmt: skip


def test_every_invisible_code_point_is_refused_and_ignored_in_comparison(submission):
    """Each default-ignorable code point, and each blank look-alike: refused in a team name and a
    base model name (naming it), and removed when names are compared."""
    from fedtune.leaderboard.invisible import BLANKS, is_invisible
    from fedtune.leaderboard.store import fold_team, team_collision
    from fedtune.leaderboard.validation import SubmissionError, validate_submission

    declared = {cp for first, last in DEFAULT_IGNORABLE for cp in range(first, last + 1)}
    assert len(declared) == 4174
    invisible = {cp for cp in range(0x110000) if is_invisible(chr(cp))}
    assert invisible == declared | {ord(ch) for ch in BLANKS}
    assert {0x2800, 0x200D, 0xFE0F, 0x034F, 0x3164, 0x115F, 0xFFA0} <= invisible
    payload = submission("ZeroOne.AI")
    published = fold_team("ZeroOne.AI")
    for cp in sorted(invisible):
        ch = chr(cp)
        for field, name in (("team", "ZeroOne.AI"), ("base_model", "Qwen2.5-7B")):
            payload[field] = name + ch
            with pytest.raises(SubmissionError) as info:
                validate_submission(payload)
            assert info.value.field == field and f"U+{cp:04X}" in info.value.reason, hex(cp)
            payload[field] = name
        for look_alike in ("ZeroOne.AI" + ch, "Zero" + ch + "One.AI", ch + "ZeroOne.AI"):
            assert fold_team(look_alike) == published, hex(cp)
        assert team_collision("Zero" + ch + "One.AI", ["Other", "ZeroOne.AI"]) == "ZeroOne.AI"
    assert validate_submission(payload).team == "ZeroOne.AI"  # the payload itself is fine


def test_the_published_team_with_an_invisible_character_is_refused(live_server, submission):
    """ZeroOne.AI followed by a character that shows as nothing looks exactly like the published
    ZeroOne.AI (and was ranked right above it): 422, naming the character; nothing stored."""
    before = live_server.store.count()
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for ch in ("\ufe0f", "\u034f", "\u3164", "\u2800", "\u115f", "\uffa0"):
            reply = client.post(
                "/api/entries",
                json=submission("ZeroOne.AI" + ch),
                headers={"Authorization": f"Bearer {live_server.store.new_token('mallory')}"},
            )
            assert reply.status_code == 422, (hex(ord(ch)), reply.text)
            error = reply.json()["error"]
            assert reply.json()["field"] == "team"
            assert f"U+{ord(ch):04X}" in error and "invisible" in error, error
    assert live_server.store.count() == before


def test_submissions_are_rate_limited_per_token(monkeypatch, store, submission):
    from starlette.testclient import TestClient

    from fedtune.leaderboard.web import app as web

    clock = [1000.0]
    monkeypatch.setattr(web.time, "monotonic", lambda: clock[0])
    limit = web.RateLimit(per_minute=2)
    assert limit.take("a") == 0 and limit.take("a") == 0
    assert limit.take("a") == pytest.approx(30.0)  # one refills every 30 s
    assert limit.take("b") == 0  # buckets are per token
    clock[0] += 30
    assert limit.take("a") == 0 and limit.take("a") > 0
    assert web.RateLimit(per_minute=0).take("a") == 0  # 0: no limit

    token = store.new_token("quick")
    client = TestClient(web.create_app(store, submissions_per_minute=2))
    headers = {"Authorization": f"Bearer {token}"}
    codes = [
        client.post(
            "/api/entries",
            json=submission("Quick", correct=(1000 + i, 1000, 1000)),
            headers=headers,
        ).status_code
        for i in range(3)
    ]
    assert codes == [201, 201, 429]
    reply = client.post("/api/entries", json=submission("Quick"), headers=headers)
    assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1
