"""`fedtune leaderboard`: submit a run, show the ranking, serve the web app, manage entries.

    fedtune leaderboard submit RUN_DIR --team T --code URL [--track general-nlp|open]
                                       [--dry-run [--allow-partial]]
    fedtune leaderboard show [--track all|general-nlp|open] [--format table|markdown|csv|json]
    fedtune leaderboard serve [--host 127.0.0.1] [--port 8000]
    fedtune leaderboard get ID | token NAME [--operator]
    fedtune leaderboard verify --server URL --token T [--once]     (a verifier worker)
    fedtune leaderboard approve ID | requeue ID | models | policy    (operators)

Every command takes `--data-dir` (default $FEDTUNE_LEADERBOARD_DIR or
~/.local/share/fedtune/leaderboard); `submit --server URL --token T` sends to a running server
instead of the local store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.leaderboard.entry import TRACKS

if TYPE_CHECKING:
    from fedtune.leaderboard.submission import SubmissionPayload

_DATA_DIR_HELP = "leaderboard data directory (default: $FEDTUNE_LEADERBOARD_DIR or ~/.local/share/fedtune/leaderboard)"  # noqa: E501


def register(subparsers: Any) -> None:
    """Add the `leaderboard` command group."""
    parser = subparsers.add_parser(
        "leaderboard",
        help="submit runs, show the ranking, serve the web page and API",
        description="The fedtune leaderboard: MMLU scores against communication cost.",
    )
    commands = parser.add_subparsers(dest="leaderboard_command", required=True, metavar="ACTION")

    submit = commands.add_parser("submit", help="turn an evaluated run directory into an entry")
    submit.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with eval/ results")
    submit.add_argument("--team", required=True, help="team name shown on the board")
    submit.add_argument("--code", required=True, metavar="URL", help="http(s) link to the code")
    submit.add_argument("--track", choices=TRACKS, default="general-nlp")
    submit.add_argument("--base-model", help="base model name to show (default: from the run)")
    submit.add_argument("--eval", dest="eval_name", help="which evaluation under RUN_DIR/eval/")
    submit.add_argument("--server", help="submit to this leaderboard server instead of locally")
    submit.add_argument("--token", help="API token for --server")
    submit.add_argument(
        "--dry-run", action="store_true", help="check and print the submission only"
    )
    submit.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --dry-run: check and print a partial evaluation's submission too, noting that "
        "the board would refuse it",
    )
    submit.add_argument("--data-dir", help=_DATA_DIR_HELP)
    submit.set_defaults(handler=_submit)

    show = commands.add_parser("show", help="print the ranking")
    show.add_argument("--track", choices=("all", *TRACKS), default="all")
    show.add_argument("--model", help="only this base model")
    show.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    show.add_argument(
        "--no-reference", action="store_true", help="hide the constant-answer reference rows"
    )
    show.add_argument("--data-dir", help=_DATA_DIR_HELP)
    show.set_defaults(handler=_show)

    serve = commands.add_parser("serve", help="serve the web page and the JSON API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--submissions-per-minute", type=int, default=60, help="per API token; 0 = no limit (60)"
    )
    serve.add_argument("--data-dir", help=_DATA_DIR_HELP)
    serve.set_defaults(handler=_serve)

    get = commands.add_parser("get", help="print one entry as JSON")
    get.add_argument("entry_id", type=int, metavar="ID")
    get.add_argument("--data-dir", help=_DATA_DIR_HELP)
    get.set_defaults(handler=_get)

    token = commands.add_parser("token", help="create an API token for submissions")
    token.add_argument("name", help="who the token is for (recorded with their submissions)")
    token.add_argument(
        "--team", help="the only team it may submit for (default: its first entry's team)"
    )
    token.add_argument(
        "--operator",
        action="store_true",
        help="an operator's token: runs verifiers, submits nothing",
    )
    token.add_argument("--data-dir", help=_DATA_DIR_HELP)
    token.set_defaults(handler=_token)

    # Operators' tools: every change is appended to the audit log with --actor.
    operator = argparse.ArgumentParser(add_help=False)
    operator.add_argument("--data-dir", help=_DATA_DIR_HELP)
    operator.add_argument(
        "--actor",
        default=os.environ.get("USER") or "operator",
        help="who makes the change, for the audit log (default: $USER)",
    )
    verify = commands.add_parser(
        "verify",
        help="run a verifier: re-generate pending entries' secret samples and post the answers",
    )
    verify.add_argument("--server", required=True, help="the leaderboard's URL")
    verify.add_argument(
        "--token",
        default=os.environ.get("FEDTUNE_OPERATOR_TOKEN"),
        help="an operator token (default: $FEDTUNE_OPERATOR_TOKEN)",
    )
    verify.add_argument("--once", action="store_true", help="stop when no entry is pending")
    verify.add_argument("--max-jobs", type=int, help="stop after this many entries")
    verify.add_argument("--poll-s", type=float, default=10.0, help="wait between empty polls")
    verify.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=LOCATION",
        help="load the board's base model NAME from LOCATION on this machine (repeatable)",
    )
    verify.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    verify.add_argument("--cache-dir", help="where downloaded adapters are kept")
    verify.add_argument("--name", help="how this worker is recorded (default host:pid)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(handler=_verify)
    approve = commands.add_parser(
        "approve", help="rank an entry held for review", parents=[operator]
    )
    approve.add_argument("entry_id", type=int, metavar="ID")
    approve.add_argument("--reason", default="", help="why (kept in the audit log)")
    approve.set_defaults(handler=_approve)
    requeue = commands.add_parser(
        "requeue", help="verify an entry again (unranked until the new verdict)", parents=[operator]
    )
    requeue.add_argument("entry_id", type=int, metavar="ID")
    requeue.add_argument("--reason", required=True, help="why (shown on the entry)")
    requeue.set_defaults(handler=_requeue)
    queue = commands.add_parser(
        "queue", help="the verifications not done yet (state, attempts, worker, progress)",
        parents=[operator],
    )  # fmt: skip
    queue.set_defaults(handler=_queue)
    models = commands.add_parser(
        "models", help="the base models a verifier can load: list, add, remove", parents=[operator]
    )
    models.add_argument("change", nargs="*", metavar="add NAME LOCATION | remove NAME")
    models.set_defaults(handler=_models)
    policy = commands.add_parser(
        "policy", help="the verification policy: show, set KEY VALUE, reset KEY", parents=[operator]
    )
    policy.add_argument("change", nargs="*", metavar="set KEY VALUE | reset KEY")
    policy.set_defaults(handler=_policy)
    for name, help_text, reason in (
        ("hide", "take an entry off every page and the ranking", False),
        ("unhide", "show a hidden or rejected entry again", False),
        ("reject", "take an entry off the ranking; its page shows the reason", True),
        ("delete", "remove an entry for good (the audit log keeps a copy)", True),
    ):
        action = commands.add_parser(name, help=help_text, parents=[operator])
        action.add_argument("entry_id", type=int, metavar="ID")
        action.add_argument("--reason", required=reason, default="", help="why (shown/kept)")
        action.set_defaults(handler=_moderate, action=name)
    rescore = commands.add_parser(
        "rescore",
        help="recompute re-scored entries from the generation files the board holds",
        parents=[operator],
    )
    rescore.add_argument("entry_ids", type=int, nargs="*", metavar="ID", help="default: all")
    rescore.set_defaults(handler=_rescore)
    tokens = commands.add_parser("tokens", help="list API tokens", parents=[operator])
    tokens.set_defaults(handler=_tokens)
    revoke = commands.add_parser(
        "revoke", help="revoke every API token of a name", parents=[operator]
    )
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)
    audit = commands.add_parser(
        "audit", help="print the audit log, newest first", parents=[operator]
    )
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--entry", type=int, help="only this entry's records")
    audit.set_defaults(handler=_audit_log)
    backup = commands.add_parser(
        "backup", help="copy the database while it is in use (SQLite online backup)",
        parents=[operator],
    )  # fmt: skip
    backup.add_argument("file", metavar="FILE")
    backup.set_defaults(handler=_backup)
    restore = commands.add_parser(
        "restore", help="replace the database by a backup (checked first)", parents=[operator]
    )
    restore.add_argument("file", metavar="FILE")
    restore.set_defaults(handler=_restore)


def _fail(message: str) -> int:
    print(f"fedtune leaderboard: {message}", file=sys.stderr)
    return 2


def _store(args: argparse.Namespace) -> Any:
    from fedtune.leaderboard.store import Store

    return Store.in_dir(args.data_dir)


PARTIAL = "partial evaluation"


def _submit(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.runs import RunDirError, build_submission
    from fedtune.leaderboard.store import DuplicateEntry
    from fedtune.leaderboard.validation import SubmissionError, check_submission

    if args.allow_partial and not args.dry_run:
        return _fail(
            "--allow-partial goes with --dry-run only: a partial evaluation is never stored"
        )
    options = {
        "team": args.team,
        "code_url": args.code,
        "track": args.track,
        "base_model": args.base_model,
        "eval_name": args.eval_name,
    }
    partial_note = None
    try:
        try:
            payload = build_submission(args.run_dir, **options)
        except RunDirError as exc:
            if not (args.allow_partial and str(exc).startswith(PARTIAL)):
                raise
            partial_note = str(exc)
            payload = _build_despite_partial(Path(args.run_dir), options)
        try:
            checked = check_submission(payload)
        except SubmissionError as exc:
            if not (args.allow_partial and exc.reason.startswith(PARTIAL)):
                raise
            partial_note = partial_note or exc.reason
    except (RunDirError, SubmissionError) as exc:
        return _fail(f"refused: {exc}")
    if args.dry_run:
        print(json.dumps(_abbreviated(payload), indent=2))
        if partial_note:
            reason = partial_note.removeprefix(f"{PARTIAL}: ")
            _fail(f"{PARTIAL}: would be refused ({reason}); nothing was stored")
        return 0
    if args.server:
        return _submit_remote(args.server, args.token, payload)
    from fedtune.leaderboard.runs import adapter_weights
    from fedtune.leaderboard.store import StoreError

    store = _store(args)
    entry = checked.entry
    weights = adapter_weights(payload)
    try:
        if weights is not None and "sha256" in payload.get("adapter", {}):
            store.put_adapter(weights, payload["adapter"]["sha256"], uploaded_by="local")
        new_id = store.add(entry, generations=checked.generations)
    except (DuplicateEntry, StoreError) as exc:
        return _fail(str(exc))
    stored = store.get(new_id)
    assert stored is not None
    print(
        f"entry {new_id} ({stored.status}): {entry.team} · {entry.base_model} · "
        f"Average {entry.average:.2f} · {entry.board_gb} · {_standing(stored.status, stored.details)}"
        f" ({store.path})"
    )
    return 0


def _standing(status: str, details: dict[str, Any]) -> str:
    """What a new entry's status means for its rank."""
    if status == "pending":
        return "not ranked until a verifier reproduces it (fedtune leaderboard verify)"
    reason = details.get("verification", {}).get("reason", "")
    return f"not ranked: {reason}" if reason else f"status {status}"


def _abbreviated(payload: SubmissionPayload) -> dict[str, Any]:
    """The submission as `--dry-run` prints it: the generation files and predictions by their size
    only."""
    shown: dict[str, Any] = dict(payload)
    files = payload.get("generations")
    if isinstance(files, dict):
        shown["generations"] = {c: f"<{len(t):,} base64 characters>" for c, t in files.items()}
    if isinstance(payload.get("predictions"), str):
        shown["predictions"] = f"<{len(payload['predictions']):,} base64 characters>"
    return shown


def _build_despite_partial(run_dir: Path, options: dict[str, Any]) -> SubmissionPayload:
    """The submission of a run whose evaluation is marked partial, every other check made.

    `build_submission` stops at the partial mark before it checks the adapter and computes the
    scores. Here it runs on a view of the run directory: links to the run's own files, and a copy
    of the evaluation results with the mark cleared. Nothing is written to the run directory.
    """
    from fedtune.leaderboard.evalresults import EvalResultsError, find_results, read_result_file
    from fedtune.leaderboard.runs import RunDirError, build_submission

    try:
        results = find_results(run_dir, options.get("eval_name")).resolve()
    except EvalResultsError as exc:
        raise RunDirError(str(exc)) from exc
    real = run_dir.resolve()
    inside = results.is_relative_to(real)
    relative = results.relative_to(real) if inside else Path("eval") / results.name
    with tempfile.TemporaryDirectory(prefix="fedtune-submit-") as scratch:
        view = Path(scratch) / run_dir.resolve().name
        view.mkdir()
        for item in real.iterdir():
            if item.name != relative.parts[0]:
                os.symlink(item, view / item.name)
        copy = view / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        try:
            document = read_result_file(results)
        except EvalResultsError as exc:
            raise RunDirError(str(exc)) from exc
        cleared = document.model_copy(update={"partial": False})
        copy.write_text(cleared.to_json_text(), encoding="utf-8")
        payload = build_submission(view, **{**options, "eval_name": str(copy)})
    # Point what names the view back at the run directory.
    adapter = payload.get("adapter")
    if isinstance(adapter, dict) and isinstance(adapter.get("location"), str):
        location = Path(adapter["location"])
        if location.is_relative_to(view):
            adapter["location"] = str(Path(run_dir) / location.relative_to(view))
    provenance = payload.get("provenance")
    if isinstance(provenance, dict) and not inside:
        provenance["evaluation_file"] = str(results)
    return payload


def _submit_remote(server: str, token: str | None, payload: SubmissionPayload) -> int:
    import httpx

    from fedtune.leaderboard.runs import adapter_weights

    if not token:
        return _fail("--server needs --token (create one with `fedtune leaderboard token NAME`)")
    weights = adapter_weights(payload)
    sha256 = payload.get("adapter", {}).get("sha256")
    try:
        if weights is not None and sha256:
            with open(weights, "rb") as handle:
                uploaded = httpx.put(
                    f"{server.rstrip('/')}/api/adapters/{sha256}",
                    content=handle,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(weights.stat().st_size),
                    },
                    timeout=600,
                )
            if uploaded.status_code not in (200, 201):
                return _fail(
                    f"adapter refused by {server} ({uploaded.status_code}): {uploaded.text}"
                )
        reply = httpx.post(
            server.rstrip("/") + "/api/entries",
            json=payload,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach {server}: {exc}")
    body = (
        reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
    )
    if reply.status_code != 201:
        return _fail(f"refused by {server} ({reply.status_code}): {body.get('error', reply.text)}")
    where = (
        f"rank {body['rank']} in {body['track']}"
        if body.get("rank") is not None
        else _standing(
            str(body.get("status")), {"verification": {"reason": body.get("reason", "")}}
        )
    )
    print(f"entry {body['id']} ({body.get('status')}): {where} · {server.rstrip('/')}{body['url']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.ranking import board_rows
    from fedtune.leaderboard.reference import constant_answer_rows
    from fedtune.leaderboard.render import render

    references = [] if args.no_reference else constant_answer_rows()
    rows = board_rows(_store(args).entries(), references, track=args.track, base_model=args.model)
    sys.stdout.write(render(rows, args.format, with_track=args.track == "all"))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fedtune.leaderboard.web.app import create_app
    from fedtune.leaderboard.web.server import server_config

    store = _store(args)
    print(f"fedtune leaderboard: {store.path} · http://{args.host}:{args.port}/", file=sys.stderr)
    app = create_app(store, submissions_per_minute=args.submissions_per_minute)
    config = server_config(app, host=args.host, port=args.port, log_level="info")
    uvicorn.Server(config).run()
    return 0


def _get(args: argparse.Namespace) -> int:
    entry = _store(args).get(args.entry_id)
    if entry is None:
        return _fail(f"no entry {args.entry_id}")
    print(json.dumps(entry.to_dict(), indent=2, ensure_ascii=False))
    return 0


def _token(args: argparse.Namespace) -> int:
    if args.operator and args.team:
        return _fail("an operator token submits for no team: leave out --team")
    role = "operator" if args.operator else "submitter"
    print(_store(args).new_token(args.name, team=args.team, role=role))
    return 0


def _moderate(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.entry import HIDDEN, REJECTED, SHOWN
    from fedtune.leaderboard.store import StoreError

    store = _store(args)
    try:
        if args.action == "delete":
            store.delete(args.entry_id, args.reason, actor=args.actor)
        else:
            decision = {"hide": HIDDEN, "unhide": SHOWN, "reject": REJECTED}[args.action]
            store.moderate(args.entry_id, decision, args.reason, actor=args.actor)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"entry {args.entry_id}: {args.action} done")
    return 0


def _tokens(args: argparse.Namespace) -> int:
    for token in _store(args).tokens():
        state = f"revoked {token['revoked_at']}" if token["revoked_at"] else "live"
        print(f"{token['name']}\t{token['sha256_prefix']}\tcreated {token['created_at']}\t{state}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    try:
        count = _store(args).revoke_token(args.name, actor=args.actor)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"revoked {count} token(s) of {args.name}")
    return 0


def _audit_log(args: argparse.Namespace) -> int:
    for record in _store(args).audit_log(args.limit, args.entry):
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _backup(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    try:
        path = _store(args).backup(args.file, actor=args.actor)
    except (StoreError, OSError) as exc:
        return _fail(str(exc))
    print(f"backup written: {path}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    try:
        _store(args).restore(args.file, actor=args.actor)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"restored from {args.file}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    """Re-score entries from their held generation files; exit 1 if any number differs."""
    from fedtune.leaderboard.validation import SubmissionError, recheck

    store = _store(args)
    ids = args.entry_ids or [e.id for e in store.entries(details=False, moderated=True)]
    checked = differ = 0
    for entry_id in ids:
        entry = store.get(entry_id)
        if entry is None:
            return _fail(f"no entry {entry_id}")
        files = store.generations(entry_id)
        if not files:
            if args.entry_ids:
                print(f"entry {entry_id} ({entry.status}): no generation files held")
            continue
        try:
            problems = recheck(entry, files)
        except SubmissionError as exc:
            problems = [str(exc)]
        checked += 1
        differ += bool(problems)
        verdict = (
            "the held files re-score to the numbers shown"
            if not problems
            else "DIFFERS: " + "; ".join(problems)
        )
        print(
            f"entry {entry_id} {entry.team}: Average {entry.average:.4f}, STEM {entry.stem:.4f}, "
            f"Social Sciences {entry.social_sciences:.4f}, Humanities {entry.humanities:.4f} · "
            f"{verdict}"
        )
    print(
        f"{checked} entr{'y' if checked == 1 else 'ies'} re-scored, {differ} differ "
        "(re-scoring checks the arithmetic; whether a model produced the files is verification's)"
    )
    return 1 if differ else 0


def _verify(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.worker import Worker

    if not args.token:
        return _fail("verify needs an operator token: --token or $FEDTUNE_OPERATOR_TOKEN")
    models = {}
    for item in args.model:
        name, sep, location = item.partition("=")
        if not sep or not name or not location:
            return _fail(f"--model takes NAME=LOCATION, got {item!r}")
        models[name] = location
    worker = Worker(
        args.server,
        args.token,
        name=args.name,
        models=models,
        cache_dir=args.cache_dir,
        dtype=args.dtype,
        show_progress=not args.no_progress,
    )
    try:
        done = worker.run(once=args.once, max_jobs=args.max_jobs, poll_s=args.poll_s)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the entry stays pending: its lease runs out, another worker takes it
        return _fail(f"verify: {exc}")
    loads = f"{worker.loads} base model load{'' if worker.loads == 1 else 's'}"
    print(f"verified {done} entr{'y' if done == 1 else 'ies'} ({loads})")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    try:
        _store(args).approve(args.entry_id, args.actor, args.reason)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"entry {args.entry_id} approved: reproduced, ranked")
    return 0


def _requeue(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    try:
        _store(args).requeue(args.entry_id, args.actor, args.reason)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"entry {args.entry_id} queued for verification")
    return 0


def _queue(args: argparse.Namespace) -> int:
    import time

    waiting = _store(args).queue()
    for item in waiting:
        progress = item["progress"] or {}
        lease = item["lease_expires"]
        left = (
            f", lease {lease - time.time():.0f} s" if item["state"] == "running" and lease else ""
        )
        print(
            f"entry {item['entry_id']} {item['team']}: {item['state']}, attempt "
            f"{item['attempts']}, worker {item['worker'] or '-'}, "
            f"{progress.get('done', 0)}/{progress.get('total', '?')} questions{left}"
        )
    print(f"{len(waiting)} verification(s) waiting")
    stalled = [str(item["entry_id"]) for item in waiting if item["state"] == "stalled"]
    if stalled:
        print(
            f"stalled (every worker that took them lost them): {', '.join(stalled)}; "
            "`fedtune leaderboard requeue ID --reason …` gives one more try"
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.store import StoreError

    store = _store(args)
    change = args.change
    try:
        if change[:1] == ["add"] and len(change) == 3:
            queued = store.set_base_model(change[1], change[2], actor=args.actor)
            print(f"{change[1]} → {change[2]} ({queued} entries queued for verification)")
        elif change[:1] == ["remove"] and len(change) == 2:
            store.set_base_model(change[1], None, actor=args.actor)
        elif change:
            return _fail("models takes: add NAME LOCATION | remove NAME")
    except StoreError as exc:
        return _fail(str(exc))
    for name, location in store.base_models().items():
        print(f"{name}\t{location}")
    return 0


def _policy(args: argparse.Namespace) -> int:
    from fedtune.leaderboard.policy import PolicyError, describe

    store = _store(args)
    change = args.change
    try:
        if change[:1] == ["set"] and len(change) == 3:
            store.set_policy(change[1], change[2], actor=args.actor)
        elif change[:1] == ["reset"] and len(change) == 2:
            store.set_policy(change[1], None, actor=args.actor)
        elif change:
            return _fail("policy takes: set KEY VALUE | reset KEY")
    except PolicyError as exc:
        return _fail(str(exc))
    values = store.policy().flat()
    for key, default, description in describe():
        print(f"{key} = {json.dumps(values[key])}\t(default {json.dumps(default)}: {description})")
    return 0
