"""The leaderboard's storage: one SQLite file, versioned migrations, safe under concurrent writers.

Every call opens its own connection, so one `Store` can be shared by the web server's worker
threads and several processes can write the same file. Writes run in `BEGIN IMMEDIATE`
transactions (the write lock is taken up front, so two writers never deadlock on a lock upgrade)
and the file is in WAL mode (readers never block the writer). A busy file is waited on for up to
`timeout_s` seconds.

The schema version is SQLite's `PRAGMA user_version`; `MIGRATIONS[i]` takes the file from version
i to i + 1. Migration 2 imports the published board, so a fresh store already holds those rows;
migration 3 adds moderation, revocable tokens and the audit log; migration 4 the generation files
of re-scored entries; migration 5 verification: held adapters, the base models a verifier can
load, the policy, the board's secret, the verification queue and operator tokens (entries that were
"re-scored" or "verified" before become "submitted": the board holds no adapter of theirs);
migration 6 recomputes the DP ε of entries that carry one (`without-replacement` was accounted with
half the sensitivity it has).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.leaderboard import verification
from fedtune.leaderboard.entry import (
    FAILED,
    HELD,
    HIDDEN,
    MODERATIONS,
    PENDING,
    PUBLISHED,
    REJECTED,
    REPRODUCED,
    SHOWN,
    SUBMITTED,
    Entry,
)
from fedtune.leaderboard.invisible import without_invisible
from fedtune.leaderboard.policy import Policy, build, parse_value
from fedtune.leaderboard.published import published_entries

DATA_DIR_ENV = "FEDTUNE_LEADERBOARD_DIR"
SUBMITTER = "submitter"
OPERATOR = "operator"
ROLES = (SUBMITTER, OPERATOR)
DB_NAME = "leaderboard.sqlite3"


class StoreError(RuntimeError):
    """The store cannot be opened or an operation on it is impossible."""


class TeamRefused(StoreError):
    """A submission's team name collides with another team's, or is not its token's team.

    Attributes:
        status: the HTTP status the API answers with (403 wrong team for the token, 409 a
            collision with an existing name).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def fold_team(name: str) -> str:
    """A team name as compared with others: without the characters that show as nothing
    (`fedtune.leaderboard.invisible`: every default-ignorable code point — variation selectors,
    Hangul fillers, zero-width joiners, bidi marks — and the braille blank), and without any other
    format character, NFKC-normalised, case-folded, whitespace collapsed.

    Invisible characters are removed before NFKC (the combining grapheme joiner would keep a
    letter and its accent from composing) and again after it (NFKC turns U+3164 and U+FFA0 into
    the Hangul filler U+1160); NFKC once more after case folding, as Unicode's NFKC_Casefold."""
    text = unicodedata.normalize("NFKC", without_invisible(name))
    text = "".join(ch for ch in without_invisible(text) if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def team_collision(team: str, existing: Iterable[str]) -> str | None:
    """The first existing team name that `team` could be mistaken for (same after folding, or
    confusable character by character per Unicode's confusables table), other than itself."""
    import confusables

    folded = fold_team(team)
    for other in existing:
        if other == team:
            continue
        folded_other = fold_team(other)
        if folded_other == folded or confusables.is_confusable(folded_other, folded):
            return other
    return None


class LeaseLost(StoreError):
    """A verifier reports on a verification it no longer holds (its lease expired and another
    worker took it, or it is done)."""


class DuplicateEntry(StoreError):
    """The same submission (same fingerprint) is already stored.

    Attributes:
        existing_id: the id of the stored entry.
    """

    def __init__(self, existing_id: int) -> None:
        super().__init__(f"the same submission is already stored as entry {existing_id}")
        self.existing_id = existing_id


def default_data_dir() -> Path:
    """$FEDTUNE_LEADERBOARD_DIR, or ~/.local/share/fedtune/leaderboard."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".local" / "share" / "fedtune" / "leaderboard"


def fingerprint(entry: Entry) -> str:
    """What makes two submissions the same: everything but date, status and id.

    A client that retries after a lost reply sends the same payload again; the fingerprint's
    UNIQUE index turns that into a `DuplicateEntry` instead of a second row.
    """
    fields = entry.to_dict()
    for volatile in (
        "id", "status", "date", "submitted_at", "comm_gb", "moderation", "moderation_reason"
    ):  # fmt: skip
        fields.pop(volatile)
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --- migrations -----------------------------------------------------------------------------------


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            status TEXT NOT NULL,
            track TEXT NOT NULL,
            team TEXT NOT NULL,
            code_url TEXT NOT NULL,
            base_model TEXT NOT NULL,
            comm_bytes INTEGER NOT NULL CHECK (comm_bytes >= 0),
            average REAL NOT NULL CHECK (average BETWEEN 0 AND 100),
            stem REAL NOT NULL CHECK (stem BETWEEN 0 AND 100),
            social_sciences REAL NOT NULL CHECK (social_sciences BETWEEN 0 AND 100),
            humanities REAL NOT NULL CHECK (humanities BETWEEN 0 AND 100),
            date TEXT NOT NULL,
            submitted_at TEXT NOT NULL,
            fingerprint TEXT NOT NULL UNIQUE,
            details TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX entries_track ON entries (track)")
    db.execute(
        """CREATE TABLE tokens (
            token_sha256 TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )


def _import_published(db: sqlite3.Connection) -> None:
    for entry in published_entries():
        _insert(db, entry, f"published:{entry.details['published_rank']}")


def _operators(db: sqlite3.Connection) -> None:
    """Moderation of entries, revocable tokens, and the append-only audit log."""
    db.execute("ALTER TABLE entries ADD COLUMN moderation TEXT NOT NULL DEFAULT 'shown'")
    db.execute("ALTER TABLE entries ADD COLUMN moderation_reason TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE tokens ADD COLUMN revoked_at TEXT")
    db.execute("ALTER TABLE tokens ADD COLUMN team TEXT")  # bound at creation or first entry
    db.execute(
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            entry_id INTEGER,
            detail TEXT NOT NULL
        )"""
    )
    # Published rows imported before their teams' repositories were known link to them now.
    for entry in published_entries():
        db.execute(
            "UPDATE entries SET code_url = ? WHERE status = 'published' "
            "AND json_extract(details, '$.published_rank') = ?",
            (entry.code_url, entry.details["published_rank"]),
        )
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"""CREATE TRIGGER audit_no_{event.lower()} BEFORE {event} ON audit
                BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"""
        )


def _generation_files(db: sqlite3.Connection) -> None:
    """The generation files a re-scored entry was scored from (gzip), kept so that its numbers can
    be recomputed at any time; they go with the entry when it is deleted."""
    db.execute(
        """CREATE TABLE generations (
            entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            category TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            content BLOB NOT NULL,
            PRIMARY KEY (entry_id, category)
        )"""
    )


# The embedded model's board name → where a verifier loads it; operators add their own.
DEFAULT_BASE_MODELS = {"SmolLM2-135M-Instruct": "embedded:smollm2-135m-instruct"}
LEGACY_REASON = (
    "stored before the board verified entries: it holds no adapter to re-generate the answers from"
)


def _verification_tables(db: sqlite3.Connection) -> None:
    """Held adapters, loadable base models, the policy, the board's secret, the queue."""
    db.execute(
        """CREATE TABLE adapters (
            sha256 TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            content BLOB NOT NULL,
            uploaded_at TEXT NOT NULL,
            uploaded_by TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE base_models (
            name TEXT PRIMARY KEY,
            location TEXT NOT NULL,
            added_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
    db.execute(
        """CREATE TABLE verifications (
            entry_id INTEGER PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done')),
            seed TEXT NOT NULL,
            sample TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease TEXT,
            lease_expires REAL,
            worker TEXT,
            progress TEXT,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            result TEXT
        )"""
    )
    db.execute("ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'submitter'")
    db.execute("INSERT INTO secrets (name, value) VALUES ('sample', ?)", (secrets.token_bytes(32),))
    for name, location in DEFAULT_BASE_MODELS.items():
        db.execute(
            "INSERT INTO base_models (name, location, added_at) VALUES (?, ?, ?)",
            (name, location, _now()),
        )
    db.execute(
        "UPDATE entries SET status = ?, details = json_set(details, '$.verification', "
        "json_object('reason', ?)) WHERE status IN ('re-scored', 'verified')",
        (SUBMITTED, LEGACY_REASON),
    )


EPSILON_CORRECTION = (
    "ε recomputed: sampling without replacement is accounted under replace-one, whose "
    "sensitivity is 2C, so the accountant's noise multiplier is σ/2 (docs/privacy.md)"
)


def _epsilon_recomputed(db: sqlite3.Connection) -> None:
    """The ε of every entry that carries a privacy section, recomputed by today's accountant: those
    with `without-replacement` accounting were stored with an ε computed from σ where the
    replace-one relation's sensitivity 2C calls for σ/2 (too small). The figure stored before is
    kept beside the new one and the change goes to the audit log."""
    from types import SimpleNamespace

    from fedtune.federation.privacy import privacy_spent

    rows = db.execute(
        "SELECT id, details FROM entries WHERE json_extract(details, '$.setup.privacy') IS NOT NULL"
    ).fetchall()
    for entry_id, text in rows:
        details = json.loads(text)
        privacy = details["setup"]["privacy"]
        dp = SimpleNamespace(
            **{k: privacy[k] for k in ("noise", "noise_multiplier", "clipping_norm", "delta")},
            accounting=privacy["accounting"],
        )
        epsilon = privacy_spent(dp, details["setup"]["num_clients"], privacy["releases"])["epsilon"]
        recomputed = epsilon if math.isfinite(epsilon) else None
        if recomputed == privacy.get("epsilon"):
            continue
        before = privacy.get("epsilon")
        privacy.update(epsilon=recomputed, epsilon_before_correction=before,
                       correction=EPSILON_CORRECTION)  # fmt: skip
        db.execute(
            "UPDATE entries SET details = ? WHERE id = ?",
            (json.dumps(details, sort_keys=True), entry_id),
        )
        _audit(db, "fedtune (schema migration 6)", "epsilon corrected", entry_id,
               {"epsilon_before": before, "epsilon": recomputed})  # fmt: skip


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _create_tables,
    _import_published,
    _operators,
    _generation_files,
    _verification_tables,
    _epsilon_recomputed,
)
SCHEMA_VERSION = len(MIGRATIONS)


# --- the store ------------------------------------------------------------------------------------


class Store:
    """A leaderboard database file (created and migrated on first use)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 30.0, migrate: bool = True) -> None:
        """Open (and by default create or migrate) the database at `path`.

        Raises:
            StoreError: the file was written by a newer fedtune (unknown schema version).
        """
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if migrate:
            self.migrate()

    @classmethod
    def in_dir(cls, data_dir: str | Path | None = None, **kwargs: Any) -> Store:
        """The store of a data directory (default: `default_data_dir()`)."""
        return cls(Path(data_dir or default_data_dir()) / DB_NAME, **kwargs)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection; closed on exit."""
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            db.execute("PRAGMA foreign_keys = ON")
            yield db
        finally:
            db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from the start."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def schema_version(self) -> int:
        """The file's schema version (0 for a new file)."""
        with self.connect() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply the missing migrations up to `target`, all in one transaction.

        Returns:
            The schema version reached.
        Raises:
            StoreError: the file's version is newer than this code knows.
        """
        with self.connect() as db:
            # WAL is a property of the file; switching needs no transaction and is idempotent.
            db.execute("PRAGMA journal_mode = WAL")
        with self.write() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this fedtune knows up to "
                    f"{SCHEMA_VERSION} (upgrade fedtune)"
                )
            for step in range(version, target):
                MIGRATIONS[step](db)
            if target > version:
                db.execute(f"PRAGMA user_version = {int(target)}")
            return max(version, target)

    # --- entries

    def add(
        self,
        entry: Entry,
        actor: str = "operator",
        token: str | None = None,
        generations: Mapping[str, bytes] | None = None,
    ) -> int:
        """Store an entry and return its new id (audited as `submit` by `actor`).

        `generations` (category → gzip of a generation file) are kept with a re-scored entry, in
        the same transaction; their sha256 is taken from the entry's evaluation.

        A "pending" entry stays pending only when the store holds its adapter's weights and its
        base model is on the board's list; then its verification is queued, with a sample drawn
        from its id under the board's secret, in the same transaction. Otherwise it is stored as
        "submitted", saying why.

        With `token` (an API submission: the token itself): the team must be the token's bound
        team (a token is bound at creation, else to the team of its first entry), must not be
        another submitter's team, and must not look like any other team's name.

        Raises:
            DuplicateEntry: the same submission is already stored.
            TeamRefused: as above.
        """
        key = fingerprint(entry)
        with self.write() as db:
            row = db.execute("SELECT id FROM entries WHERE fingerprint = ?", (key,)).fetchone()
            if row is not None:
                raise DuplicateEntry(int(row[0]))
            if token is not None:
                _check_team(db, entry.team, _sha256(token))
            if entry.status == PENDING:
                reason = _unverifiable(db, entry)
                if reason:
                    details = {**entry.details, "verification": {"reason": reason}}
                    entry = dataclasses.replace(entry, status=SUBMITTED, details=details)
            new_id = _insert(db, entry, key)
            rescored = entry.details.get("evaluation", {}).get("rescored", {})
            for category, content in (generations or {}).items():
                db.execute(
                    "INSERT INTO generations (entry_id, category, sha256, content) "
                    "VALUES (?, ?, ?, ?)",
                    (new_id, category, rescored[category]["sha256"], content),
                )
            if entry.status == PENDING:
                _queue(db, new_id, _policy(db))
            _audit(
                db, actor, "submit", new_id,
                {"team": entry.team, "track": entry.track, "status": entry.status},
            )  # fmt: skip
            return new_id

    def generations(self, entry_id: int) -> dict[str, bytes]:
        """The generation files kept with an entry (category → gzip), empty if none."""
        if not 0 < entry_id < 2**63:
            return {}
        with self.connect() as db:
            rows = db.execute(
                "SELECT category, content FROM generations WHERE entry_id = ? ORDER BY category",
                (entry_id,),
            ).fetchall()
        return {str(category): bytes(content) for category, content in rows}

    def get(self, entry_id: int) -> Entry | None:
        """The entry with this id, or None (also for ids SQLite cannot hold)."""
        if not 0 < entry_id < 2**63:
            return None
        with self.connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row) if row else None

    def entries(
        self, track: str | None = None, *, details: bool = True, moderated: bool = False
    ) -> list[Entry]:
        """The shown entries (of one track if given), in id order.

        Args:
            track: only this track.
            details: False leaves `details` empty, for ranking and tables (much less to decode).
            moderated: also the hidden and rejected ones (operators' listings).
        """
        columns = _COLUMNS if details else _COLUMNS.replace(" details,", " '{}',")
        query = f"SELECT {columns} FROM entries WHERE 1 = 1"
        args: list[Any] = []
        if track:
            query += " AND track = ?"
            args.append(track)
        if not moderated:
            query += " AND moderation = ?"
            args.append(SHOWN)
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [_entry(row) for row in rows]

    def round_curves(self) -> dict[int, list[dict[str, Any]]]:
        """Entry id → its submitted `rounds`, for the shown entries whose rounds carry held-out
        losses (what the board's Cost-to-Target column reads; SQLite picks them out of the
        details, so the board still decodes no entry's whole details)."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT id, json_extract(details, '$.rounds') FROM entries WHERE moderation = ? "
                "AND EXISTS (SELECT 1 FROM json_each(details, '$.rounds') "
                "WHERE json_extract(value, '$.heldout_loss') IS NOT NULL) "
                "ORDER BY id",
                (SHOWN,),
            ).fetchall()
        return {int(entry_id): json.loads(text) for entry_id, text in rows}

    def count(self) -> int:
        """The number of stored entries."""
        with self.connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def moderate(self, entry_id: int, moderation: str, reason: str, actor: str) -> None:
        """Show, hide or reject an entry; audited with the reason.

        Raises:
            StoreError: unknown id or decision, or a rejection without a reason.
        """
        if moderation not in MODERATIONS:
            raise StoreError(f"must be one of {', '.join(MODERATIONS)}, got {moderation!r}")
        if moderation == REJECTED and not reason.strip():
            raise StoreError("a rejection needs a reason (it is shown on the entry)")
        with self.write() as db:
            row = db.execute("SELECT moderation FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                raise StoreError(f"no entry {entry_id}")
            db.execute(
                "UPDATE entries SET moderation = ?, moderation_reason = ? WHERE id = ?",
                (moderation, reason.strip() if moderation != SHOWN else "", entry_id),
            )
            action = {SHOWN: "show", HIDDEN: "hide", REJECTED: "reject"}[moderation]
            _audit(db, actor, action, entry_id, {"from": row[0], "reason": reason.strip()})

    def delete(self, entry_id: int, reason: str, actor: str) -> None:
        """Remove an entry for good; the audit log keeps a copy of it.

        Raises:
            StoreError: unknown id, or no reason.
        """
        if not reason.strip():
            raise StoreError("a deletion needs a reason (it is kept in the audit log)")
        with self.write() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                raise StoreError(f"no entry {entry_id}")
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            _audit(
                db, actor, "delete", entry_id, {"reason": reason, "entry": _entry(row).to_dict()}
            )

    def audit_log(self, limit: int = 100, entry_id: int | None = None) -> list[dict[str, Any]]:
        """The newest `limit` audit records (of one entry if given), newest first."""
        query = "SELECT id, at, actor, action, entry_id, detail FROM audit"
        args: list[Any] = []
        if entry_id is not None:
            query += " WHERE entry_id = ?"
            args.append(entry_id)
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
        return [
            {"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "entry_id": r[4],
             "detail": json.loads(r[5])}
            for r in rows
        ]  # fmt: skip

    def backup(self, target: str | Path, actor: str = "operator") -> Path:
        """A consistent copy of the database made while it is in use (SQLite's online backup).

        Raises:
            StoreError: the target exists.
        """
        target = Path(target)
        if target.exists():
            raise StoreError(f"{target} exists; choose a new file")
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.write() as db:
            _audit(db, actor, "backup", None, {"file": str(target)})
        with self.connect() as source:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        return target

    def restore(self, source: str | Path, actor: str = "operator") -> None:
        """Replace the database's contents by a backup's (checked first), then record it.

        Raises:
            StoreError: not a readable fedtune leaderboard backup, or one from a newer fedtune.
        """
        source = Path(source)
        if not source.is_file():
            raise StoreError(f"{source} is not a file")
        try:
            check = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
            try:
                ok = check.execute("PRAGMA integrity_check").fetchone()[0]
                version = int(check.execute("PRAGMA user_version").fetchone()[0])
                check.execute("SELECT COUNT(*) FROM entries").fetchone()
            finally:
                check.close()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{source} is not a leaderboard database ({exc})") from exc
        if ok != "ok" or not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(f"{source}: integrity {ok!r}, schema version {version}")
        with self.connect() as db:  # the log so far: a restore must not rewind it
            history = db.execute(
                "SELECT id, at, actor, action, entry_id, detail FROM audit"
            ).fetchall()
        backup = sqlite3.connect(source)
        try:
            with self.connect() as target:
                backup.backup(target)
        finally:
            backup.close()
        self.migrate()  # a backup from an older schema is brought up to date
        with self.write() as db:
            kept = set(db.execute("SELECT id, at, actor, action, entry_id, detail FROM audit"))
            for record in history:
                if tuple(record) not in kept:  # made after the backup: appended again, in order
                    db.execute(
                        "INSERT INTO audit (at, actor, action, entry_id, detail) "
                        "VALUES (?, ?, ?, ?, ?)",
                        record[1:],
                    )
            _audit(db, actor, "restore", None, {"file": str(source), "schema_version": version})

    # --- evidence: adapters and the base models a verifier can load

    def put_adapter(self, source: str | Path | bytes, sha256: str, uploaded_by: str) -> bool:
        """Keep an adapter's weights file (PEFT safetensors), by its sha256; False when it is
        held already. Written in chunks, so a large file is never in memory whole.

        Raises:
            StoreError: the content's sha256 is not `sha256`, or it is over the policy's size cap.
        """
        path = None if isinstance(source, bytes) else Path(source)
        size = len(source) if isinstance(source, bytes) else path.stat().st_size  # type: ignore[union-attr]
        cap = self.policy().max_adapter_bytes
        if size > cap:
            raise StoreError(f"adapter of {size:,} bytes; the board takes at most {cap:,}")
        digest = hashlib.sha256()
        with self.write() as db:
            if db.execute("SELECT 1 FROM adapters WHERE sha256 = ?", (sha256,)).fetchone():
                return False
            cursor = db.execute(
                "INSERT INTO adapters (sha256, size, content, uploaded_at, uploaded_by) "
                "VALUES (?, ?, zeroblob(?), ?, ?)",
                (sha256, size, size, _now(), uploaded_by),
            )
            with db.blobopen("adapters", "content", int(cursor.lastrowid or 0)) as blob:
                for chunk in _chunks(source):
                    digest.update(chunk)
                    blob.write(chunk)
            if digest.hexdigest() != sha256:
                raise StoreError(f"the adapter's sha256 is {digest.hexdigest()}, not {sha256}")
            _audit(db, uploaded_by, "adapter", None, {"sha256": sha256, "size": size})
        return True

    def adapter_size(self, sha256: str) -> int | None:
        """The held adapter's size in bytes, or None when it is not held."""
        with self.connect() as db:
            row = db.execute("SELECT size FROM adapters WHERE sha256 = ?", (sha256,)).fetchone()
        return int(row[0]) if row else None

    def read_adapter(self, sha256: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The held adapter's bytes, in chunks (nothing when it is not held)."""
        with self.connect() as db:
            row = db.execute("SELECT rowid FROM adapters WHERE sha256 = ?", (sha256,)).fetchone()
            if row is None:
                return
            with db.blobopen("adapters", "content", int(row[0]), readonly=True) as blob:
                while chunk := blob.read(chunk_bytes):
                    yield chunk

    def base_models(self) -> dict[str, str]:
        """The base models a verifier can load: board name → location (embedded:…, a local path
        on the verifier's machine, or a hub id)."""
        with self.connect() as db:
            rows = db.execute("SELECT name, location FROM base_models ORDER BY name").fetchall()
        return {str(name): str(location) for name, location in rows}

    def set_base_model(self, name: str, location: str | None, actor: str = "operator") -> int:
        """Add (or move) a base model, or remove it (`location` None). Entries on a newly added
        model that were unverifiable only for want of it are queued for verification.

        Returns:
            How many entries were queued.
        Raises:
            StoreError: removing a model that is not listed.
        """
        with self.write() as db:
            if location is None:
                if not db.execute("DELETE FROM base_models WHERE name = ?", (name,)).rowcount:
                    raise StoreError(f"no base model {name!r} on the list")
                _audit(db, actor, "base-model-remove", None, {"name": name})
                return 0
            db.execute(
                "INSERT INTO base_models (name, location, added_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET location = excluded.location",
                (name, location, _now()),
            )
            queued = _requeue_unverifiable(db, name)
            _audit(db, actor, "base-model", None, {"name": name, "location": location,
                                                    "queued": queued})  # fmt: skip
            return len(queued)

    # --- the policy

    def policy(self) -> Policy:
        """The verification policy: the operator's settings over the defaults."""
        with self.connect() as db:
            return _policy(db)

    def set_policy(self, key: str, value: str | None, actor: str = "operator") -> Policy:
        """Set one policy key (`value` as typed: JSON or text), or reset it to its default (None).

        Raises:
            PolicyError: an unknown key or a value out of range (nothing is changed).
        """
        with self.write() as db:
            current = _settings(db)
            if value is None:
                current.pop(key, None)
            else:
                current[key] = parse_value(value)
            build(current)  # refuses before anything is written
            db.execute("DELETE FROM settings WHERE key = ?", (key,))
            if value is not None:
                db.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?)",
                    (key, json.dumps(current[key])),
                )
            _audit(db, actor, "policy", None, {"key": key, "value": current.get(key)})
            return build(current)

    # --- the verification queue

    def claim_verification(self, worker: str) -> dict[str, Any] | None:
        """Hand the oldest waiting verification to `worker`: one that is queued, or whose
        worker's lease expired (that worker died or was cut off) fewer than the policy's
        `max-attempts` times — one lost that often is `stalled` until an operator requeues it —
        on a base model still on the list (one taken off it waits until it is back). None when
        there is none.

        Returns:
            The job: entry id, lease (quote it when reporting), the protocol and shots, the base
            model and where to load it, the adapter (sha256, size, config), and the questions.
        """
        now = time.time()
        with self.write() as db:
            policy = _policy(db)
            row = db.execute(
                "SELECT v.entry_id, v.sample, v.attempts FROM verifications v "
                "JOIN entries e ON e.id = v.entry_id WHERE e.status = ? AND "
                "e.base_model IN (SELECT name FROM base_models) AND "
                "(v.state = 'queued' OR "
                "(v.state = 'running' AND v.lease_expires < ? AND v.attempts < ?)) "
                "ORDER BY v.entry_id LIMIT 1",
                (PENDING, now, policy.max_attempts),
            ).fetchone()
            if row is None:
                return None
            entry_id, sample, attempts = int(row[0]), json.loads(row[1]), int(row[2]) + 1
            lease = secrets.token_hex(16)
            db.execute(
                "UPDATE verifications SET state = 'running', lease = ?, lease_expires = ?, "
                "worker = ?, attempts = ?, progress = NULL WHERE entry_id = ?",
                (lease, now + policy.lease_s, worker, attempts, entry_id),
            )
            entry = _entry(db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?",
                                      (entry_id,)).fetchone())  # fmt: skip
            adapter = entry.details.get("adapter", {})
            models = dict(db.execute("SELECT name, location FROM base_models").fetchall())
            _audit(db, f"worker:{worker}", "claim", entry_id, {"attempt": attempts})
        evaluation = entry.details.get("evaluation", {})
        return {
            "entry_id": entry_id,
            "lease": lease,
            "lease_s": policy.lease_s,
            "attempt": attempts,
            "protocol": evaluation.get("protocol"),
            "shots": int(evaluation.get("shots", 0)),
            "base_model": entry.base_model,
            "model_location": models.get(entry.base_model),
            "adapter": {
                "sha256": adapter.get("sha256"),
                "size": self.adapter_size(str(adapter.get("sha256"))),
                "config": adapter.get("config"),
            },
            "questions": [list(q) for q in sample],
        }

    def verification_progress(self, entry_id: int, lease: str, done: int, total: int) -> float:
        """A worker's sign of life: records its progress and renews its lease.

        Returns:
            The lease's new expiry (Unix seconds).
        Raises:
            LeaseLost: the worker no longer holds this verification.
        """
        with self.write() as db:
            _held(db, entry_id, lease)
            expires = time.time() + _policy(db).lease_s
            db.execute(
                "UPDATE verifications SET lease_expires = ?, progress = ? WHERE entry_id = ?",
                (expires, json.dumps({"done": done, "total": total}), entry_id),
            )
        return expires

    def finish_verification(
        self,
        entry_id: int,
        lease: str,
        answers: Any,
        worker: Mapping[str, Any],
        error: str | None = None,
    ) -> dict[str, Any]:
        """Record a worker's re-generated answers: compare them with the held files' letters on
        the sample and set the entry's status (reproduced, held for review, failed verification).
        `error` instead of answers: the adapter does not load on the base model (failed).
        Exactly once: the lease is checked and the verification closed in one transaction.

        Returns:
            The verdict as stored with the entry (`details["verification"]`).
        Raises:
            LeaseLost: the worker no longer holds this verification.
            VerificationError: the answers are not one per sampled question.
        """
        with self.write() as db:
            sample = [(str(s), int(i)) for s, i in json.loads(_held(db, entry_id, lease))]
            entry = _entry(
                db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
            )
            policy = _policy(db)
            ceiling = policy.ceiling(entry.track, _best_published(db))
            seed, attempts = db.execute(
                "SELECT seed, attempts FROM verifications WHERE entry_id = ?", (entry_id,)
            ).fetchone()
            record: dict[str, Any] = {
                "threshold": policy.agreement_threshold,
                "ceiling": ceiling,
                "seed": seed,
                "sample": [list(q) for q in sample],
                "attempts": attempts,
                "worker": dict(worker),
                "finished_at": _now(),
            }
            if error is not None:
                record.update(status=FAILED, error=error[:2000], sampled=len(sample), agreed=0,
                              agreement=0.0)  # fmt: skip
            else:
                comparison = _compare(db, entry, sample, answers)
                status = verification.verdict(
                    comparison, policy.agreement_threshold, entry.average, ceiling
                )
                record.update(status=status, **comparison.to_json())
            _set_status(db, entry_id, record["status"], {**entry.details, "verification": record})
            db.execute(
                "UPDATE verifications SET state = 'done', lease = NULL, finished_at = ?, "
                "result = ? WHERE entry_id = ?",
                (record["finished_at"], json.dumps(record), entry_id),
            )
            _audit(
                db, f"worker:{worker.get('name', '?')}", "verification", entry_id,
                {"status": record["status"], "agreed": record["agreed"],
                 "sampled": record["sampled"], "error": error},
            )  # fmt: skip
        return record

    def verification(self, entry_id: int) -> dict[str, Any] | None:
        """An entry's place in the queue (state, attempts, worker, progress; operators only:
        the sample stays secret until the verdict), or None."""
        with self.connect() as db:
            row = db.execute(
                "SELECT state, attempts, worker, progress, lease_expires, created_at, finished_at "
                "FROM verifications WHERE entry_id = ?",
                (entry_id,),
            ).fetchone()
            max_attempts = _policy(db).max_attempts
        if row is None:
            return None
        state, attempts, worker, progress, expires, created, finished = row
        state = _shown_state(state, attempts, expires, max_attempts)
        return {"state": state, "attempts": attempts, "worker": worker,
                "progress": json.loads(progress) if progress else None,
                "lease_expires": expires, "created_at": created, "finished_at": finished}  # fmt: skip

    def queue(self) -> list[dict[str, Any]]:
        """The verifications not done yet, oldest first: entry, team, state (`queued`,
        `running` or `stalled`), attempts, worker, progress and when its lease runs out
        (operators' view)."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT v.entry_id, e.team, v.state, v.attempts, v.worker, v.progress, "
                "v.lease_expires FROM verifications v JOIN entries e ON e.id = v.entry_id "
                "WHERE v.state != 'done' ORDER BY v.entry_id"
            ).fetchall()
            max_attempts = _policy(db).max_attempts
        return [
            {"entry_id": r[0], "team": r[1], "state": _shown_state(r[2], r[3], r[6], max_attempts),
             "attempts": r[3], "worker": r[4],
             "progress": json.loads(r[5]) if r[5] else None, "lease_expires": r[6]}
            for r in rows
        ]  # fmt: skip

    def approve(self, entry_id: int, actor: str, reason: str = "") -> None:
        """Rank an entry held for review (it was reproduced; an operator looked at it).

        Raises:
            StoreError: unknown id, or not held for review.
        """
        with self.write() as db:
            status, details = _status_details(db, entry_id)
            if status != HELD:
                raise StoreError(f"entry {entry_id} is {status!r}, not held for review")
            details.setdefault("verification", {})["approved"] = {"by": actor, "at": _now(),
                                                                  "reason": reason}  # fmt: skip
            _set_status(db, entry_id, REPRODUCED, details)
            _audit(db, actor, "approve", entry_id, {"reason": reason})

    def requeue(self, entry_id: int, actor: str, reason: str) -> None:
        """Verify an entry again (same sample): after a failure an operator traces to the
        verifier, or for a reproduced entry under doubt. It is unranked until the new verdict.

        Raises:
            StoreError: unknown id, or an entry with no verification (nothing to re-run).
        """
        with self.write() as db:
            status, details = _status_details(db, entry_id)
            if not db.execute(
                "SELECT 1 FROM verifications WHERE entry_id = ?", (entry_id,)
            ).fetchone():
                raise StoreError(f"entry {entry_id} has no verification to run again")
            details["verification"] = {"previous": details.get("verification"), "reason": reason}
            _set_status(db, entry_id, PENDING, details)
            db.execute(
                "UPDATE verifications SET state = 'queued', lease = NULL, lease_expires = NULL, "
                "progress = NULL, finished_at = NULL, result = NULL WHERE entry_id = ?",
                (entry_id,),
            )
            _audit(db, actor, "requeue", entry_id, {"from": status, "reason": reason})

    # --- API tokens (only their sha256 is stored)

    def new_token(
        self,
        name: str,
        actor: str = "operator",
        team: str | None = None,
        role: str = SUBMITTER,
    ) -> str:
        """Create an API token for `name` and return it (it is shown once, stored hashed).

        Args:
            team: the only team a submitter's token may submit for (else: its first entry's).
            role: "submitter" (submits entries, uploads adapters) or "operator" (runs verifiers).
        """
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        token = secrets.token_urlsafe(32)
        with self.write() as db:
            db.execute(
                "INSERT INTO tokens (token_sha256, name, created_at, team, role) "
                "VALUES (?, ?, ?, ?, ?)",
                (_sha256(token), name, _now(), team, role),
            )
            _audit(db, actor, "token", None, {"name": name, "team": team, "role": role,
                                              "sha256_prefix": _sha256(token)[:12]})  # fmt: skip
        return token

    def token_role(self, token: str) -> str | None:
        """A live token's role ("submitter" or "operator"), or None (unknown or revoked)."""
        with self.connect() as db:
            row = db.execute(
                "SELECT role FROM tokens WHERE token_sha256 = ? AND revoked_at IS NULL",
                (_sha256(token),),
            ).fetchone()
        return str(row[0]) if row else None

    def token_owner(self, token: str) -> str | None:
        """The key under which a live token submits — `sha256:<first 12 hex>` of its hash, so
        tokens of one name stay apart — or None (unknown or revoked)."""
        digest = _sha256(token)
        with self.connect() as db:
            row = db.execute(
                "SELECT name FROM tokens WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)
            ).fetchone()
        return _owner_label(row[0], digest) if row else None

    def tokens(self) -> list[dict[str, Any]]:
        """Every token: name, its hash's first 12 hex digits, created, revoked (or None)."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT name, token_sha256, created_at, revoked_at, team, role FROM tokens "
                "ORDER BY created_at"
            ).fetchall()
        return [
            {"name": r[0], "sha256_prefix": r[1][:12], "created_at": r[2], "revoked_at": r[3],
             "team": r[4], "role": r[5]}
            for r in rows
        ]  # fmt: skip

    def revoke_token(self, name: str, actor: str = "operator") -> int:
        """Revoke every live token issued to `name`; how many.

        Raises:
            StoreError: no live token has that name.
        """
        with self.write() as db:
            count = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (_now(), name),
            ).rowcount
            if not count:
                raise StoreError(f"no live token for {name!r}")
            _audit(db, actor, "revoke", None, {"name": name, "tokens": count})
        return int(count)


_COLUMNS = (
    "id, status, track, team, code_url, base_model, comm_bytes, average, stem, social_sciences,"
    " humanities, date, submitted_at, details, moderation, moderation_reason"
)


def _insert(db: sqlite3.Connection, entry: Entry, key: str) -> int:
    cursor = db.execute(
        """INSERT INTO entries (status, track, team, code_url, base_model, comm_bytes, average,
            stem, social_sciences, humanities, date, submitted_at, fingerprint, details)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            entry.status,
            entry.track,
            entry.team,
            entry.code_url,
            entry.base_model,
            entry.comm_bytes,
            entry.average,
            entry.stem,
            entry.social_sciences,
            entry.humanities,
            entry.date,
            entry.submitted_at or _now(),
            key,
            json.dumps(entry.details, sort_keys=True),
        ),
    )
    return int(cursor.lastrowid or 0)


def _entry(row: Sequence[Any]) -> Entry:
    (id_, status, track, team, code_url, base_model, comm_bytes, average, stem, social,
     humanities, date, submitted_at, details, moderation, reason) = row  # fmt: skip
    return Entry(
        id=int(id_),
        status=status,
        track=track,
        team=team,
        code_url=code_url,
        base_model=base_model,
        comm_bytes=int(comm_bytes),
        average=float(average),
        stem=float(stem),
        social_sciences=float(social),
        humanities=float(humanities),
        date=date,
        submitted_at=submitted_at,
        details=json.loads(details),
        moderation=moderation,
        moderation_reason=reason,
    )


def _chunks(source: str | Path | bytes, size: int = 1 << 20) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), size):
            yield source[start : start + size]
        return
    with open(source, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def _settings(db: sqlite3.Connection) -> dict[str, Any]:
    return {str(k): json.loads(v) for k, v in db.execute("SELECT key, value FROM settings")}


def _shown_state(state: str, attempts: int, expires: float | None, max_attempts: int) -> str:
    """A verification's state as operators see it: `stalled` is one whose last worker lost it
    (its lease ran out) after `max_attempts` tries — no worker gets it until it is requeued."""
    lost = state == "running" and expires is not None and expires < time.time()
    return "stalled" if lost and attempts >= max_attempts else state


def _policy(db: sqlite3.Connection) -> Policy:
    return build(_settings(db))


def _best_published(db: sqlite3.Connection) -> float:
    row = db.execute("SELECT MAX(average) FROM entries WHERE status = ?", (PUBLISHED,)).fetchone()
    return float(row[0] or 0.0)


def _unverifiable(db: sqlite3.Connection, entry: Entry) -> str:
    """Why the store cannot verify an entry that carries its evidence ("" when it can)."""
    sha = entry.details.get("adapter", {}).get("sha256")
    if not db.execute("SELECT 1 FROM adapters WHERE sha256 = ?", (sha,)).fetchone():
        return f"the board does not hold the adapter {sha}: upload it before submitting"
    if not db.execute("SELECT 1 FROM base_models WHERE name = ?", (entry.base_model,)).fetchone():
        return (
            f"the board cannot load the base model {entry.base_model!r} "
            "(not on its list of base models)"
        )
    return ""


def _queue(db: sqlite3.Connection, entry_id: int, policy: Policy) -> None:
    """Queue an entry's verification with its secret sample, drawn now."""
    secret = db.execute("SELECT value FROM secrets WHERE name = 'sample'").fetchone()[0]
    seed = verification.sample_seed(bytes(secret), entry_id)
    sample = verification.draw_sample(seed, policy.sample_per_category)
    db.execute(
        "INSERT INTO verifications (entry_id, state, seed, sample, created_at) "
        "VALUES (?, 'queued', ?, ?, ?)",
        (entry_id, seed, json.dumps(sample), _now()),
    )


def _requeue_unverifiable(db: sqlite3.Connection, base_model: str) -> list[int]:
    """Queue the entries on `base_model` that were unverifiable only because it was not listed."""
    queued = []
    rows = db.execute(
        "SELECT id, details FROM entries WHERE status = ? AND base_model = ?",
        (SUBMITTED, base_model),
    ).fetchall()
    policy = _policy(db)
    for entry_id, details_json in rows:
        details = json.loads(details_json)
        reason = details.get("verification", {}).get("reason", "")
        if not reason.startswith("the board cannot load the base model"):
            continue
        details.pop("verification")
        _set_status(db, int(entry_id), PENDING, details)
        if not db.execute("SELECT 1 FROM verifications WHERE entry_id = ?", (entry_id,)).fetchone():
            _queue(db, int(entry_id), policy)
        queued.append(int(entry_id))
    return queued


def _compare(
    db: sqlite3.Connection, entry: Entry, sample: list[tuple[str, int]], answers: Any
) -> verification.Comparison:
    """The entry's held letters on the sample against a verifier's answers."""
    evaluation = entry.details.get("evaluation", {})
    formats = {
        c: str(v.get("format", "generations")) for c, v in evaluation.get("rescored", {}).items()
    }
    files = {
        str(c): bytes(content)
        for c, content in db.execute(
            "SELECT category, content FROM generations WHERE entry_id = ?", (entry.id,)
        )
    }
    regenerated = verification.regenerated_letters(str(evaluation.get("protocol")), answers, sample)
    submitted = verification.submitted_letters(files, formats, sample)
    return verification.compare(submitted, regenerated, sample)


def _status_details(db: sqlite3.Connection, entry_id: int) -> tuple[str, dict[str, Any]]:
    """An entry's status and details.

    Raises:
        StoreError: no such entry.
    """
    row = db.execute("SELECT status, details FROM entries WHERE id = ?", (entry_id,)).fetchone()
    if row is None:
        raise StoreError(f"no entry {entry_id}")
    return str(row[0]), json.loads(row[1])


def _held(db: sqlite3.Connection, entry_id: int, lease: str) -> str:
    """The sample of a verification `lease` still holds.

    Raises:
        LeaseLost: it does not (another worker took it after the lease expired, or it is done).
    """
    if not 0 < entry_id < 2**63:  # beyond SQLite's INTEGER: no such verification
        raise LeaseLost(f"entry {entry_id}: no such verification")
    row = db.execute(
        "SELECT sample FROM verifications WHERE entry_id = ? AND state = 'running' AND lease = ?",
        (entry_id, lease),
    ).fetchone()
    if row is None:
        raise LeaseLost(f"entry {entry_id}: this worker no longer holds its verification")
    return str(row[0])


def _set_status(
    db: sqlite3.Connection, entry_id: int, status: str, details: dict[str, Any]
) -> None:
    db.execute(
        "UPDATE entries SET status = ?, details = ? WHERE id = ?",
        (status, json.dumps(details, sort_keys=True), entry_id),
    )


def _check_team(db: sqlite3.Connection, team: str, digest: str) -> None:
    """See Store.add; binds an unbound token to `team`. Submitters are told apart by
    `submitted_by` (token_owner's label), which names the token's hash prefix."""
    row = db.execute(
        "SELECT name, team FROM tokens WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)
    ).fetchone()
    if row is None:
        raise TeamRefused("the token is unknown or revoked", 401)
    name, bound = row
    if bound is not None and bound != team:
        raise TeamRefused(f"this token submits for team {bound!r}, not {team!r}", 403)
    owner = _owner_label(name, digest)
    teams: dict[str, set[str]] = {}
    for other, details in db.execute("SELECT team, details FROM entries"):
        teams.setdefault(other, set()).add(str(json.loads(details).get("submitted_by", "")))
    if team in teams and teams[team] != {owner}:
        raise TeamRefused(f"team {team!r} is another submitter's", 409)
    collision = team_collision(team, teams)
    if collision is not None:
        raise TeamRefused(
            f"team name {team!r} is too close to the existing team {collision!r}", 409
        )
    if bound is None:
        db.execute("UPDATE tokens SET team = ? WHERE token_sha256 = ?", (team, digest))


def _owner_label(name: str, digest: str) -> str:
    return f"{name} ({digest[:12]})"


def _audit(
    db: sqlite3.Connection, actor: str, action: str, entry_id: int | None, detail: dict[str, Any]
) -> None:
    """Append one record to the audit log (inside the caller's transaction)."""
    db.execute(
        "INSERT INTO audit (at, actor, action, entry_id, detail) VALUES (?, ?, ?, ?, ?)",
        (_now(), actor, action, entry_id, json.dumps(detail, sort_keys=True, ensure_ascii=False)),
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
