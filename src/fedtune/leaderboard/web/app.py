"""The leaderboard web app (Starlette): the board, entry pages and a JSON API.

    GET  /                       the ranked board (?track=all|general-nlp|open&model=<base model>)
    GET  /entry/{id}             one entry
    GET  /api/entries            ranked rows of a view (same query), constant-answer rows included
    GET  /api/entries/{id}       one entry with all details and its rank in its track
    POST /api/entries            submit (Authorization: Bearer <token>; JSON, see validation.py)
    PUT  /api/adapters/{sha256}  upload an adapter's weights file before submitting (a token)
    GET  /api/adapters/{sha256}  a held adapter (a shown entry's, or any to an operator)
    POST /api/verifications/claim                 a verifier takes the next job (operator)
    POST /api/verifications/{id}/progress         its sign of life (renews the lease)
    POST /api/verifications/{id}/result           its re-generated answers → the verdict
    GET  /api/reference          the constant-answer reference rows
    GET  /healthz                liveness

Submissions are refused with a JSON `{"error": reason, "field": …}`: 400 malformed or too deeply
nested JSON, 401 no, unknown or revoked token, 403 a team other than the token's, 409 the same
submission again or a team name that is another's (or looks like it), 413 a body over the limit,
415 not JSON, 422 a submission that fails validation or its track's rules, 429 over the token's
submissions a minute (with Retry-After), 503 a worker process checking it died (with Retry-After).

A submission is parsed and checked in a worker process (`checks.py`), never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedtune.leaderboard.entry import HIDDEN, REJECTED, TRACKS, Entry
from fedtune.leaderboard.ranking import (
    ALL_TRACKS,
    board_rows,
    bytes_to_target,
    pareto_front,
    rank,
)
from fedtune.leaderboard.reference import constant_answer_rows
from fedtune.leaderboard.render import row_record
from fedtune.leaderboard.store import (
    OPERATOR,
    DuplicateEntry,
    LeaseLost,
    Store,
    StoreError,
    TeamRefused,
)
from fedtune.leaderboard.validation import MAX_BODY_BYTES, SubmissionError
from fedtune.leaderboard.verification import (
    VerificationError,
    check_adapter_file,
    question_index,
)
from fedtune.leaderboard.web.charts import score_vs_cost
from fedtune.leaderboard.web.checks import (
    CHECK_WORKERS,
    BadBody,
    CheckerRestarted,
    CheckPool,
    check_body,
)
from fedtune.leaderboard.web.pages import board_page, entry_page, not_found_page
from fedtune.units import MIB

STATIC_DIR = Path(__file__).parent / "static"

# No inline script or style and nothing from another origin: an escaping slip cannot run code.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]  # fmt: skip


class _SecurityHeaders:
    """Pure ASGI middleware adding SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class _TooLarge(Exception):
    pass


def _error(status: int, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": reason, **extra}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and _ASCII_DIGITS.fullmatch(declared)
        and (len(declared) > 12 or int(declared) > limit)
    ):
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a lying or absent Content-Length is caught while reading
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(body.decode("utf-8"), parse_constant=no_constants)


async def _spool_body(request: Request, limit: int, target: Any) -> None:
    """Stream a request body into a file, refusing it past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        target.write(chunk)
    target.flush()


def _adapter_is_shown(store: Store, sha256: str) -> bool:
    """Whether a shown entry names this adapter (only those are served to everyone)."""
    return any(
        e.details.get("adapter", {}).get("sha256") == sha256 for e in store.entries(details=True)
    )


class RateLimit:
    """A token bucket per API token: `per_minute` submissions a minute, bursts up to that many.
    Kept in the server process (a restart refills every bucket)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}  # owner → (tokens left, at)
        self.lock = threading.Lock()

    def take(self, owner: str) -> float:
        """0 when `owner` may submit now (and one is taken), else the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self.lock:
            left, at = self.buckets.get(owner, (float(self.per_minute), now))
            left = min(float(self.per_minute), left + (now - at) * rate)
            if left >= 1.0:
                self.buckets[owner] = (left - 1.0, now)
                return 0.0
            self.buckets[owner] = (left, now)
            return (1.0 - left) / rate


def create_app(
    store: Store,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    submissions_per_minute: int = 60,
    check_workers: int = CHECK_WORKERS,
) -> Starlette:
    """The ASGI app over a store.

    Args:
        store: where entries and API tokens live.
        max_body_bytes: submissions above this size get 413.
        submissions_per_minute: per API token (429 beyond; 0 = no limit).
        check_workers: processes that check submissions (started and stopped by the lifespan).
    """
    references = constant_answer_rows()
    limit = RateLimit(submissions_per_minute)
    checks = CheckPool(check_workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The store's team check imports Unicode's confusables table on first use: ~0.1 s of JSON
        # parsing that holds the interpreter lock, so the event loop too. Once, before serving.
        importlib.import_module("confusables")
        # Likewise the scored test questions that a new entry's verification sample is drawn from
        # (~0.5 s to decompress and index the shipped split).
        question_index()
        checks.start()
        try:
            yield
        finally:
            await run_in_threadpool(checks.close)

    def view(request: Request) -> tuple[str, str | None]:
        track = request.query_params.get("track") or ALL_TRACKS
        model = request.query_params.get("model") or None
        return track, model

    def board(request: Request) -> Response:
        track, model = view(request)
        if track not in (ALL_TRACKS, *TRACKS):
            track = ALL_TRACKS
        entries = store.entries(details=False)
        in_track = [e for e in entries if track == ALL_TRACKS or e.track == track]
        models = sorted({e.base_model for e in in_track}, key=str.lower)
        if model not in models:
            model = None
        rows = board_rows(entries, references, track=track, base_model=model)
        shown = [r.entry for r in rows if r.entry is not None]
        pages = max(1, math.ceil(len(rows) / ROWS_PER_PAGE))
        page = min(_int_param(request, "page", 1, minimum=1), pages)
        start = (page - 1) * ROWS_PER_PAGE
        front = pareto_front(e for e in shown if e.ranked)
        target = store.policy().target_heldout_loss
        costs = (
            None
            if target is None
            else {i: bytes_to_target(r, target) for i, r in store.round_curves().items()}
        )
        chart = (
            f'<div class="wide-only">{score_vs_cost(shown, front, references)}</div>'
            f'<div class="narrow-only">{score_vs_cost(shown, front, references, compact=True)}</div>'
        )
        html = board_page(
            rows[start : start + ROWS_PER_PAGE],
            track=track,
            base_model=model,
            models=models,
            chart=chart,
            shown_entries=len(shown),
            page=page,
            pages=pages,
            first_row=start + 1,
            total_rows=len(rows),
            target=target,
            costs=costs,
        )
        return HTMLResponse(html)

    def entry(request: Request) -> Response:
        found = _ranked_entry(store, int(request.path_params["entry_id"]))
        if found is None:
            return HTMLResponse(not_found_page("No such entry."), status_code=404)
        item, position = found
        target = store.policy().target_heldout_loss
        return HTMLResponse(entry_page(item, position, references, target))

    def api_list(request: Request) -> Response:
        track, model = view(request)
        if track not in (ALL_TRACKS, *TRACKS):
            return _error(
                400, f"track must be one of {ALL_TRACKS}, {', '.join(TRACKS)}", field="track"
            )
        include_reference = request.query_params.get("reference", "1") not in ("0", "false", "no")
        rows = board_rows(
            store.entries(details=False),
            references if include_reference else (),
            track=track,
            base_model=model,
        )
        offset = _int_param(request, "offset", 0, minimum=0)
        limit = min(_int_param(request, "limit", MAX_API_ROWS, minimum=1), MAX_API_ROWS)
        records = [row_record(r) for r in rows[offset : offset + limit]]
        return JSONResponse(
            {
                "track": track,
                "base_model": model,
                "total": len(rows),
                "offset": offset,
                "limit": limit,
                "count": len(records),
                "rows": records,
            }
        )

    def api_get(request: Request) -> Response:
        entry_id = int(request.path_params["entry_id"])
        found = _ranked_entry(store, entry_id)
        if found is None:
            return _error(404, f"no entry {entry_id}")
        item, position = found
        return JSONResponse({**item.to_dict(), "rank": position})

    def api_generations(request: Request) -> Response:
        entry_id = int(request.path_params["entry_id"])
        category = request.path_params["category"]
        found = _ranked_entry(store, entry_id)
        if found is None:
            return _error(404, f"no entry {entry_id}")
        files = store.generations(entry_id)
        held = found[0].details.get("evaluation", {}).get("rescored", {}).get(category, {})
        stem = "predictions" if held.get("format") == "predictions" else "generation"
        if category not in files:
            return _error(404, f"entry {entry_id} has no {category} generation file")
        return Response(
            files[category],
            media_type="application/gzip",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="{stem}_mmlu_{category}_entry{entry_id}.jsonl.gz"'
                )
            },
        )

    def api_reference(request: Request) -> Response:
        return JSONResponse({"rows": [r.to_dict() for r in references]})

    async def api_submit(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        owner = await run_in_threadpool(store.token_owner, token) if token else None
        if owner is None:
            return JSONResponse(
                {"error": "a valid API token is required (Authorization: Bearer <token>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        wait = limit.take(owner)
        if wait:
            return JSONResponse(
                {"error": f"more than {limit.per_minute} submissions a minute from this token"},
                status_code=429,
                headers={"Retry-After": str(math.ceil(wait))},
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _error(415, "send the submission as application/json")
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            return _error(413, f"submission larger than {max_body_bytes:,} bytes")
        try:
            # Parsing and checking (a DP ε recomputed, files decompressed and re-scored) is CPU
            # work of up to seconds: in a worker process, while the event loop serves the rest.
            checked = await checks.run(check_body, body)
        except BadBody as exc:
            return _error(400, exc.reason)
        except SubmissionError as exc:
            return _error(422, exc.reason, field=exc.field)
        except CheckerRestarted as exc:
            return JSONResponse({"error": f"{exc}; send it again"}, 503, {"Retry-After": "1"})
        submitted = dataclasses.replace(
            checked.entry, details={**checked.entry.details, "submitted_by": owner}
        )
        try:
            new_id = await run_in_threadpool(
                store.add, submitted, f"token:{owner}", token, checked.generations
            )
        except DuplicateEntry as exc:
            return _error(409, str(exc), id=exc.existing_id)
        except TeamRefused as exc:
            return _error(exc.status, str(exc), field="team")
        found = await run_in_threadpool(_ranked_entry, store, new_id)
        position = found[1] if found else None
        stored = found[0] if found else submitted
        return JSONResponse(
            {
                "id": new_id,
                "status": stored.status,
                "reason": stored.details.get("verification", {}).get("reason", ""),
                "rank": position,
                "track": submitted.track,
                "url": f"/entry/{new_id}",
            },
            status_code=201,
        )

    def _token(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else ""

    async def _operator(request: Request) -> str | None:
        """The operator token's owner, or None (not a live operator token)."""
        token = _token(request)
        if not token or await run_in_threadpool(store.token_role, token) != OPERATOR:
            return None
        return await run_in_threadpool(store.token_owner, token)

    def _unauthorized(what: str) -> Response:
        return JSONResponse(
            {"error": f"{what} (Authorization: Bearer <token>)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def api_put_adapter(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        token = _token(request)
        owner = await run_in_threadpool(store.token_owner, token) if token else None
        if owner is None:
            return _unauthorized("a valid API token is required")
        if not _SHA256_PATH.match(sha256):
            return _error(400, "the address names the weights' sha256: 64 lower-case hex digits")
        if await run_in_threadpool(store.adapter_size, sha256) is not None:
            return JSONResponse({"sha256": sha256, "held": True}, status_code=200)
        cap = (await run_in_threadpool(store.policy)).max_adapter_bytes
        with tempfile.NamedTemporaryFile(dir=store.path.parent, prefix="upload-") as scratch:
            try:
                await _spool_body(request, cap, scratch)
            except _TooLarge:
                return _error(413, f"adapter larger than {cap:,} bytes")
            try:
                await run_in_threadpool(check_adapter_file, scratch.name)
                await run_in_threadpool(store.put_adapter, scratch.name, sha256, f"token:{owner}")
            except (VerificationError, StoreError) as exc:
                return _error(422, str(exc), field="adapter")
        return JSONResponse({"sha256": sha256, "held": True}, status_code=201)

    async def api_get_adapter(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        size = await run_in_threadpool(store.adapter_size, sha256)
        shown = size is not None and (
            await _operator(request) is not None
            or await run_in_threadpool(_adapter_is_shown, store, sha256)
        )
        if not shown:
            return _error(404, f"no adapter {sha256[:64]}")
        return StreamingResponse(
            store.read_adapter(sha256),
            media_type="application/octet-stream",
            headers={"Content-Length": str(size),
                     "Content-Disposition": f'attachment; filename="{sha256}.safetensors"'},
        )  # fmt: skip

    async def _json_body(request: Request) -> Any:
        """An operator's JSON body (a verifier's report), parsed off the event loop; None when it
        is too large or not JSON."""
        try:
            body = await _read_body(request, MAX_VERIFIER_BODY_BYTES)
            return await run_in_threadpool(_parse_json, body)
        except (_TooLarge, UnicodeDecodeError, ValueError, RecursionError):
            return None

    async def api_claim(request: Request) -> Response:
        worker = await _operator(request)
        if worker is None:
            return _unauthorized("an operator token is required")
        job = await run_in_threadpool(store.claim_verification, worker)
        if job is None:
            return Response(status_code=204)
        return JSONResponse(job)

    async def api_progress(request: Request) -> Response:
        if await _operator(request) is None:
            return _unauthorized("an operator token is required")
        body = await _json_body(request)
        if not (isinstance(body, dict) and isinstance(body.get("lease"), str)):
            return _error(400, "send {lease, done, total}")
        done, total = body.get("done"), body.get("total")
        try:
            expires = await run_in_threadpool(
                store.verification_progress,
                int(request.path_params["entry_id"]),
                body["lease"],
                done if isinstance(done, int) else 0,
                total if isinstance(total, int) else 0,
            )
        except LeaseLost as exc:
            return _error(409, str(exc))
        return JSONResponse({"lease_expires": expires})

    async def api_result(request: Request) -> Response:
        worker = await _operator(request)
        if worker is None:
            return _unauthorized("an operator token is required")
        body = await _json_body(request)
        if not (isinstance(body, dict) and isinstance(body.get("lease"), str)):
            return _error(400, "send {lease, answers, worker} (or {lease, error, worker})")
        about = body.get("worker")
        info: dict[str, Any] = {}
        if isinstance(about, dict):
            info = {str(k)[:40]: v for k, v in about.items() if isinstance(v, str | int | float)}
        info = {k: v[:200] if isinstance(v, str) else v for k, v in info.items()}
        info["name"] = worker
        error = body.get("error")
        try:
            # Reading the held files and comparing is ~0.3 s of Python: in a worker process.
            record = await checks.run(
                store.finish_verification,
                int(request.path_params["entry_id"]),
                body["lease"],
                body.get("answers"),
                info,
                error if isinstance(error, str) else None,
            )
        except LeaseLost as exc:
            return _error(409, str(exc))
        except VerificationError as exc:
            return _error(422, str(exc), field="answers")
        except CheckerRestarted as exc:
            return JSONResponse({"error": f"{exc}; send it again"}, 503, {"Retry-After": "1"})
        return JSONResponse({k: record[k] for k in ("status", "agreed", "sampled", "agreement")})

    def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "entries": store.count()})

    def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return _error(404, "no such resource")
        return HTMLResponse(not_found_page("No such page."), status_code=404)

    app = Starlette(
        routes=[
            Route("/", board),
            Route("/entry/{entry_id:int}", entry),
            Route("/api/entries", api_list, methods=["GET"]),
            Route("/api/entries", api_submit, methods=["POST"]),
            Route("/api/entries/{entry_id:int}", api_get),
            Route("/api/entries/{entry_id:int}/generations/{category}", api_generations),
            Route("/api/adapters/{sha256}", api_put_adapter, methods=["PUT"]),
            Route("/api/adapters/{sha256}", api_get_adapter, methods=["GET"]),
            Route("/api/verifications/claim", api_claim, methods=["POST"]),
            Route("/api/verifications/{entry_id:int}/progress", api_progress, methods=["POST"]),
            Route("/api/verifications/{entry_id:int}/result", api_result, methods=["POST"]),
            Route("/api/reference", api_reference),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={404: not_found},
        lifespan=lifespan,
    )
    app.add_middleware(_SecurityHeaders)
    app.state.checks = checks
    return app


# A verifier's answers: 300 questions × ~60 bytes; 5,000 a category at most (the policy's cap).
MAX_VERIFIER_BODY_BYTES = 4 * MIB
_SHA256_PATH = re.compile(r"^[0-9a-f]{64}$")
ROWS_PER_PAGE = 200  # rows of the board's table per page
MAX_API_ROWS = 1000  # rows per /api/entries answer (offset and limit page through the rest)
# Not str.isdigit, which also takes "²" (that int() refuses: a 500) and "５" or "١" (that it reads).
_ASCII_DIGITS = re.compile(r"[0-9]+")


def _int_param(request: Request, name: str, default: int, *, minimum: int) -> int:
    """A whole-number query parameter in ASCII digits (at most 12); anything else — a sign,
    other digits such as "²", "١٢" or "５", which str.isdigit accepts — gives the default, and a
    number below `minimum` gives `minimum`."""
    text = request.query_params.get(name, "")
    if not _ASCII_DIGITS.fullmatch(text) or len(text) > 12:
        return default
    return max(minimum, int(text))


def _ranked_entry(store: Store, entry_id: int) -> tuple[Entry, int | None] | None:
    """An entry with its rank among the shown entries of its track (None for a rejected one);
    None for an unknown or hidden entry."""
    item = store.get(entry_id)
    if item is None or item.moderation == HIDDEN:
        return None
    if item.moderation == REJECTED:
        return item, None
    for position, other in rank(store.entries(item.track, details=False)):
        if other.id == entry_id:
            return item, position
    return item, None  # shown, but self-reported: no rank
