"""The JSON API and the pages over a real HTTP server (uvicorn on a loopback port)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx
import pytest

from .lb_submissions import ADAPTER_BYTES, honest_answers


@pytest.fixture
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        yield http


def _auth(live_server):
    return {"Authorization": f"Bearer {live_server.token}"}


def test_list_and_get(client):
    listing = client.get("/api/entries").json()
    assert listing["count"] == 19 + 4
    entries = [r for r in listing["rows"] if r["kind"] == "entry"]
    assert [r["rank"] for r in entries] == list(range(1, 20))
    assert entries[0]["team"] == "ZeroOne.AI" and entries[0]["comm_gb"] == 2.9
    one = client.get(f"/api/entries/{entries[2]['id']}").json()
    assert one["rank"] == 3 and one["details"]["evaluation"]["protocol"] == "flowertune"
    assert client.get("/api/entries?track=open&reference=0").json()["rows"] == []
    reference = client.get("/api/reference").json()["rows"]
    assert [r["average"] for r in reference] == [22.39, 23.94, 25.72, 27.95]


def test_not_found_and_bad_queries(client):
    reply = client.get("/api/entries/999")
    assert reply.status_code == 404 and "999" in reply.json()["error"]
    assert client.get("/entry/999").status_code == 404
    assert client.get("/nowhere").status_code == 404
    reply = client.get("/api/entries?track=closed")
    assert reply.status_code == 400 and reply.json()["field"] == "track"


def test_submit_then_see_it_ranked(client, live_server, submission):
    payload = submission("API Team", correct=(1900, 2000, 2600), generations=True)
    # Without its adapter on the board the entry cannot be verified: listed, never ranked.
    reply = client.post("/api/entries", json=payload, headers=_auth(live_server))
    assert reply.status_code == 201, reply.text
    assert reply.json()["status"] == "submitted" and reply.json()["rank"] is None
    assert "upload it before submitting" in reply.json()["reason"]
    live_server.store.delete(reply.json()["id"], "test", "tests")
    # The adapter first (checked to be safetensors, by its sha256), then the submission.
    sha = payload["adapter"]["sha256"]
    put = client.put(f"/api/adapters/{sha}", content=b"not safetensors", headers=_auth(live_server))
    assert put.status_code == 422 and "safetensors" in put.json()["error"]
    put = client.put(f"/api/adapters/{'0' * 64}", content=ADAPTER_BYTES, headers=_auth(live_server))
    assert put.status_code == 422 and "sha256" in put.json()["error"]
    assert client.put(f"/api/adapters/{sha}", content=ADAPTER_BYTES).status_code == 401
    live_server.store.set_policy("max-adapter-mib", "1")
    too_big = client.put(f"/api/adapters/{sha}", content=b"\0" * (1024 * 1024 + 1),
                         headers=_auth(live_server))  # fmt: skip
    assert too_big.status_code == 413
    put = client.put(f"/api/adapters/{sha}", content=ADAPTER_BYTES, headers=_auth(live_server))
    assert put.status_code == 201, put.text
    assert client.get(f"/api/adapters/{sha}").status_code == 404  # no shown entry names it yet
    reply = client.post("/api/entries", json=payload, headers=_auth(live_server))
    assert reply.status_code == 201, reply.text
    created = reply.json()
    assert created["status"] == "pending" and created["rank"] is None
    assert created["track"] == "open"
    # A verifier (operator token) takes the job over the API and re-generates the same letters.
    operator = {"Authorization": f"Bearer {live_server.store.new_token('ops', role='operator')}"}
    assert client.post("/api/verifications/claim", headers=_auth(live_server)).status_code == 401
    job = client.post("/api/verifications/claim", headers=operator).json()
    assert job["entry_id"] == created["id"] and len(job["questions"]) == 300
    assert job["model_location"] == "embedded:smollm2-135m-instruct"
    assert client.get(f"/api/adapters/{sha}").content == ADAPTER_BYTES  # named by a shown entry
    answers = honest_answers(live_server.store, job)
    beat = {"lease": job["lease"], "done": 100, "total": 300}
    assert client.post(f"/api/verifications/{created['id']}/progress", json=beat,
                       headers=operator).status_code == 200  # fmt: skip
    stale = {"lease": "0" * 32, "answers": answers}
    assert client.post(f"/api/verifications/{created['id']}/result", json=stale,
                       headers=operator).status_code == 409  # fmt: skip
    result = client.post(f"/api/verifications/{created['id']}/result",
                         json={"lease": job["lease"], "answers": answers}, headers=operator)  # fmt: skip
    assert result.status_code == 200 and result.json()["status"] == "reproduced"
    assert result.json()["agreed"] == 300
    assert client.post("/api/verifications/claim", headers=operator).status_code == 204
    huge = {"lease": job["lease"], "done": 1, "total": 1}
    assert client.post(f"/api/verifications/{10**30}/progress", json=huge,
                       headers=operator).status_code == 409  # fmt: skip
    everything = client.get("/api/entries?reference=0").json()["rows"]
    ours = next(r for r in everything if r["id"] == created["id"])
    # 60.26 STEM / 65.00 / 55.26 → Average 60.17: between Phi-4 (55.64) and ZJUDAI Qwen-7B (64.04).
    assert ours["rank"] == 8
    assert everything[6]["team"] == "ZJUDAI" and everything[8]["team"] == "Massimo R. Scamarcia"
    stored = client.get(f"/api/entries/{created['id']}").json()
    assert stored["details"]["submitted_by"].startswith(
        "tests ("
    )  # the token's name and hash prefix
    assert stored["status"] == "reproduced" and stored["rank"] == 1  # first of the open track
    assert stored["details"]["verification"]["agreed"] == 300
    page = client.get(created["url"])
    assert page.status_code == 200 and "API Team" in page.text and 'id="subjects"' in page.text
    # Anyone can fetch the files the numbers come from and score them again.
    from fedtune.evaluation.rescore import parse_generations, rescore_rows

    files = stored["details"]["evaluation"]["rescored"]
    for category, held in files.items():
        got = client.get(f"/api/entries/{created['id']}/generations/{category}")
        assert got.status_code == 200 and got.headers["content-type"] == "application/gzip"
        again = rescore_rows(parse_generations(got.content))
        assert (again.correct, again.rows) == (held["correct"], held["rows"])
        assert 100 * again.correct / again.rows == stored[category]
    assert client.get(f"/api/entries/{created['id']}/generations/other").status_code == 404


def test_self_reported_scores_are_shown_but_not_ranked(client, live_server, submission):
    # 100 % everywhere, claimed without generation files: listed, never ranked above anyone.
    best = (3153, 3077, 4705)
    reply = client.post(
        "/api/entries", json=submission("Claims", correct=best), headers=_auth(live_server)
    )
    assert reply.status_code == 201, reply.text
    created = reply.json()
    assert created["rank"] is None and created["status"] == "submitted"
    rows = client.get("/api/entries?track=all").json()["rows"]
    assert rows[0]["team"] == "ZeroOne.AI" and rows[0]["rank"] == 1
    assert rows[-1]["id"] == created["id"] and rows[-1]["rank"] is None  # after every ranked row
    assert [r["rank"] for r in rows if r["kind"] == "entry"][:-1] == list(range(1, 20))
    page = client.get(created["url"]).text
    assert "not ranked: self-reported" in page
    assert client.get(f"/api/entries/{created['id']}/generations/stem").status_code == 404
    board = client.get("/").text
    assert board.index("ZeroOne.AI") < board.index(">Claims<")


def test_refusals_have_a_status_and_a_reason(client, live_server, submission):
    good = submission("Refused Team")
    before = client.get("/api/entries").json()["count"]
    cases = [
        ({}, json.dumps(good), "application/json", 401, "token"),
        ({"Authorization": "Bearer nope"}, json.dumps(good), "application/json", 401, "token"),
        (_auth(live_server), json.dumps(good), "text/plain", 415, "application/json"),
        (_auth(live_server), "{not json", "application/json", 400, "not valid JSON"),
        (_auth(live_server), '{"team": NaN}', "application/json", 400, "NaN"),
        (_auth(live_server), json.dumps({**good, "team": None}), "application/json", 422, "team"),
        (
            _auth(live_server),
            json.dumps({**good, "scores": {**good["scores"], "stem": 101}}),
            "application/json",
            422,
            "percentage",
        ),
        (
            _auth(live_server),
            json.dumps({**good, "communication": {"total_bytes": -1}}),
            "application/json",
            422,
            "below",
        ),
        (_auth(live_server), json.dumps({**good, "track": "general-nlp",
         "setup": {"dataset": "embedded:alpaca-gpt4-sample", "num_clients": 20}}),
         "application/json", 422, "Alpaca-GPT4"),
    ]  # fmt: skip
    for headers, body, content_type, status, reason in cases:
        reply = client.post(
            "/api/entries", content=body, headers={**headers, "Content-Type": content_type}
        )
        assert reply.status_code == status, (status, reply.text)
        assert reason in reply.json()["error"] or reason == reply.json().get("field")
    assert client.get("/api/entries").json()["count"] == before  # nothing stored, nothing lost


def test_oversized_submissions_get_413(client, live_server, submission):
    big = submission("Big", provenance={"padding": "x" * 4000, "more": ["y" * 4000] * 4500})
    body = json.dumps(big).encode()
    assert len(body) > 16 * 1024 * 1024
    reply = client.post(
        "/api/entries",
        content=body,
        headers={**_auth(live_server), "Content-Type": "application/json"},
    )
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    reply = client.post(
        "/api/entries",
        content=chunks(),
        headers={**_auth(live_server), "Content-Type": "application/json"},
    )
    assert reply.status_code == 413


def test_duplicate_submission_is_refused(client, live_server, submission):
    payload = submission("Twice")
    first = client.post("/api/entries", json=payload, headers=_auth(live_server))
    again = client.post("/api/entries", json=payload, headers=_auth(live_server))
    assert first.status_code == 201
    assert again.status_code == 409 and again.json()["id"] == first.json()["id"]


def test_user_input_is_escaped_everywhere(client, live_server, submission):
    team = '<script>alert("x")</script><b onmouseover=alert(1)>bold</b>'
    payload = submission(team, base_model="<i>Model</i>", config={"<k>": "<v>"})
    reply = client.post("/api/entries", json=payload, headers=_auth(live_server))
    assert reply.status_code == 201
    for path in ("/", reply.json()["url"], "/?model=%3Ci%3EModel%3C%2Fi%3E"):
        page = client.get(path)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<b onmouseover" not in page.text
        assert "<i>Model</i>" not in page.text and "<k>" not in page.text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"


def test_static_assets_are_served_by_the_app(client):
    page = client.get("/").text
    assert 'src="/static/board.js"' in page and 'href="/static/board.css"' in page
    # Nothing is loaded from elsewhere (links to code are fine: they are not loaded).
    assert not re.search(r'<(script|link|img|iframe)[^>]*(src|href)="(https?:)?//', page)
    assert client.get("/static/board.js").status_code == 200
    assert client.get("/static/board.css").headers["content-type"].startswith("text/css")


def test_hostile_but_well_formed_requests_get_4xx_never_500(client, live_server, submission):
    headers = _auth(live_server)
    # Extreme but valid communication costs must not take the board down.
    for team, cost in (("One Byte", 1), ("Huge", 10**18)):
        token = live_server.store.new_token(team)  # a token is bound to one team
        reply = client.post(
            "/api/entries",
            json=submission(team, comm_bytes=cost),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert reply.status_code == 201, reply.text
    for page in ("/", "/?track=open"):
        reply = client.get(page)
        assert reply.status_code == 200 and "One Byte" in reply.text and "Huge" in reply.text
    assert client.get("/?track=general-nlp").status_code == 200
    deep = "[" * 100_000 + "]" * 100_000
    reply = client.post(
        "/api/entries", content=deep, headers={**headers, "content-type": "application/json"}
    )
    assert reply.status_code == 400 and "nested deeper" in reply.json()["error"]
    reply = client.post(
        "/api/entries",
        content='{"a": ' + "[" * 40 + "1" + "]" * 40 + "}",  # parses, but 41 levels deep
        headers={**headers, "content-type": "application/json"},
    )
    assert reply.status_code == 400 and "nested deeper than 32" in reply.json()["error"]
    for url in ("/api/entries/99999999999999999999999", "/entry/99999999999999999999999"):
        assert client.get(url).status_code == 404


def test_many_rows_are_paged(client, live_server, submission):
    from fedtune.leaderboard.validation import validate_submission

    for i in range(420):
        live_server.store.add(
            validate_submission(submission(f"Bulk {i:03d}", correct=(500 + i, 1000, 1000)))
        )
    total = 19 + 420 + 4
    first = client.get("/")
    assert first.text.count('<tr class="entry') + first.text.count('<tr class="reference') == 200
    assert "rows 1–200 of 443" in first.text and 'rel="next"' in first.text
    last = client.get("/?track=all&page=3")
    assert last.text.count("<tr class=") == total - 400 and 'rel="next"' not in last.text
    assert client.get("/?page=99").status_code == 200  # past the end: the last page
    assert client.get("/?page=-1&track=all").status_code == 200
    whole = client.get("/api/entries?limit=1000").json()
    assert whole["total"] == whole["count"] == total
    paged = []
    for offset in range(0, total, 150):
        chunk = client.get(f"/api/entries?offset={offset}&limit=150").json()
        assert chunk["total"] == total and chunk["limit"] == 150
        paged += chunk["rows"]
    assert paged == whole["rows"]
    assert client.get("/api/entries?limit=999999").json()["limit"] == 1000


HOSTILE_VALUES = [
    None, True, 0, -1, 10**30, 1e308, -1e-308, "", " ", "x" * 5000, "<script>alert(1)</script>",
    '=HYPERLINK("http://x")', "\u202etxt", [], [1, "a"], {}, {"nested": {"deeper": [[[]]]}},
    # Digits that str.isdigit takes (int() refuses "²"); integers beyond a float's range.
    "²", "١٢", "５", 10**400, -(10**400),
    # Characters that show as nothing (default-ignorable, a blank), after a published name.
    "ZeroOne.AI\ufe0f", "ZeroOne.AI\u3164", "\u2800", "a\U000e0001b",
]  # fmt: skip


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaves(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            yield from _leaves(child, (*path, index))
    yield path


def _replaced(document, path, new):
    import copy

    out = copy.deepcopy(document)
    if not path:
        return new
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


def test_no_hostile_submission_gets_a_500(store, submission):
    """Every field of a valid submission, in turn, replaced by each hostile value: the answer is
    a 4xx (or 201/409 where the value happens to be acceptable), never a 5xx."""
    from starlette.testclient import TestClient

    from fedtune.leaderboard.web.app import create_app

    token = store.new_token("fuzz")
    client = TestClient(create_app(store, submissions_per_minute=0))
    headers = {"Authorization": f"Bearer {token}"}
    valid = submission("Fuzz Team")
    statuses: dict[int, int] = {}
    for path in _leaves(valid):
        for value in HOSTILE_VALUES:
            reply = client.post("/api/entries", json=_replaced(valid, path, value), headers=headers)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (path, value, reply.text[:200])
    for body in (b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"a": NaN}', b"1" * 100_000):
        reply = client.post(
            "/api/entries", content=body, headers={**headers, "content-type": "application/json"}
        )
        assert 400 <= reply.status_code < 500, body[:20]
    fields = sum(1 for _ in _leaves(valid))  # 196: every leaf of the submission, adapter config too
    assert fields > 190 and sum(statuses.values()) == fields * len(HOSTILE_VALUES)
    assert statuses.get(422, 0) > 2500


QUERY_VALUES = [
    "", " ", "-1", "0", "1e3", "0x10", "+5", " 5", "5 ", "1.5", "x" * 5000, "9" * 13,
    str(10**400), str(-(10**400)), "²", "١٢", "５", "²³", "\u2800", "\ufe0f", "1\u200b",
    "all\u3164", "<script>alert(1)</script>", "%00", "\x00", "\u202e",
]  # fmt: skip


def test_no_hostile_query_gets_a_500(store):
    """Every query parameter of the board and the list API, and every path parameter, given each
    hostile value: never a 5xx. Page, offset and limit read ASCII digits only; anything else
    gives the default."""
    from starlette.testclient import TestClient

    from fedtune.leaderboard.web.app import create_app

    client = TestClient(create_app(store))
    params = ("page", "offset", "limit", "track", "model", "reference")
    for value in QUERY_VALUES:
        for path in ("/", "/api/entries"):
            for name in params:
                reply = client.get(path, params={name: value})
                assert reply.status_code < 500, (path, name, value, reply.text[:200])
                if name in ("page", "offset", "limit") and not value.isascii():
                    assert reply.status_code == 200, (path, name, value)
            reply = client.get(path, params=dict.fromkeys(params, value))
            assert reply.status_code < 500, (path, value, reply.text[:200])
        for path in ("/entry/{}", "/api/entries/{}", "/api/entries/1/generations/{}"):
            reply = client.get(path.format(quote(value, safe="")))
            assert reply.status_code < 500, (path, value, reply.text[:200])
        declared = value[:20].encode() or b"x"  # a Content-Length such as "²" (bytes: any)
        reply = client.post("/api/entries", content=b"{}", headers={"content-length": declared})
        assert reply.status_code < 500, (value, reply.text[:200])
    # Unreadable numbers give the default: offset 0, limit 1,000, the first page.
    for value in ("²", "١٢", "５", "-1", str(10**400)):
        listing = client.get("/api/entries", params={"offset": value, "limit": value}).json()
        assert (listing["offset"], listing["limit"]) == (0, 1000), value
        assert client.get("/", params={"page": value}).text == client.get("/").text
    every = client.get("/api/entries").json()["rows"]
    assert client.get("/api/entries?offset=5&limit=2").json()["rows"] == every[5:7]


def test_no_hostile_generations_get_a_500(store, submission):
    """The generation files, and each of them, replaced by each hostile value: always a 4xx."""
    from starlette.testclient import TestClient

    from fedtune.leaderboard.web.app import create_app

    token = store.new_token("fuzz")
    client = TestClient(create_app(store, submissions_per_minute=0))
    headers = {"Authorization": f"Bearer {token}"}
    valid = submission("Fuzz Files", generations=True)
    paths = [p for p in _leaves(valid) if p[:1] == ("generations",)]
    assert len(paths) == 4
    for path in paths:
        for value in HOSTILE_VALUES:
            reply = client.post("/api/entries", json=_replaced(valid, path, value), headers=headers)
            assert 400 <= reply.status_code < 500, (path, value, reply.text[:200])
    assert store.count() == 19  # nothing stored
