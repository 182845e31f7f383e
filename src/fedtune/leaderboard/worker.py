"""`fedtune leaderboard verify`: a verifier worker.

It takes pending entries from a leaderboard server over its API (an operator token), re-generates
each entry's secret sample of answers from the base model and the submitted adapter with the
entry's own protocol (`fedtune eval`'s code: the board protocol with its near-tie re-checks, or
`loglik`), and posts them; the server compares and decides (`fedtune.leaderboard.verification`).

    claim → download the adapter (sha256 checked) → load base model + adapter (strictly) →
    run the protocol on the sample, reporting progress (which renews the lease) → post answers

Run it where the models fit: a GPU machine for 7–9B entries, a CPU for the embedded model. A
worker that crashes or is killed loses nothing: its lease runs out and the next worker takes the
entry again; a worker whose lease was lost stops that job and posts nothing. An adapter that does
not load on its base model fails the entry (with PEFT's reason); any other error (the base model
cannot be loaded here, out of memory) leaves the entry pending for another worker.

The base model stays loaded between jobs on the same base model and dtype: each job's adapter is
taken off again with PEFT's `unload()` (no merge: the base weights are never written), which gives
back the very modules and tensors loaded, so a job's answers are those of a fresh load. A job that
ends any other way (an adapter PEFT refused half-way, an error) drops the model; the next loads it
anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from fedtune.evaluation.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from fedtune.provenance import file_sha256

POLL_S = 10.0
HTTP_TIMEOUT_S = 60.0


class LeaseLostError(RuntimeError):
    """The server gave this job to another worker (our lease expired)."""


class Worker:
    """One verifier: an API client, an adapter cache and the protocols."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        name: str | None = None,
        models: Mapping[str, str] | None = None,
        cache_dir: str | Path | None = None,
        dtype: str = "auto",
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            server: the leaderboard's base URL.
            token: an operator token (`fedtune leaderboard token NAME --operator`).
            name: how the worker is recorded (default host:pid).
            models: board base-model name → where this machine loads it, over the server's list.
            cache_dir: where downloaded adapters are kept (by sha256).
            dtype: the compute dtype ("auto": bf16 on a GPU, fp32 on a CPU, as `fedtune eval`).
        """
        self.server = server.rstrip("/")
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S
        )
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.models = dict(models or {})
        self.cache = Path(cache_dir or Path.home() / ".cache" / "fedtune" / "verifier")
        self.dtype = dtype
        self.show_progress = show_progress
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.loads = 0  # base models loaded from disk (the rest were reused)
        self._base: tuple[tuple[str, str], Any, Any] | None = None  # (location, dtype), model, tok

    # --- the loop

    def run(
        self, *, once: bool = False, max_jobs: int | None = None, poll_s: float = POLL_S
    ) -> int:
        """Take and verify jobs until none is left (`once`) or forever; how many were done."""
        done = 0
        while max_jobs is None or done < max_jobs:
            job = self.claim()
            if job is None:
                if once:
                    break
                time.sleep(poll_s)
                continue
            self.verify(job)
            done += 1
        return done

    def claim(self) -> dict[str, Any] | None:
        """The next job, or None."""
        reply = self.client.post(f"{self.server}/api/verifications/claim", json={})
        if reply.status_code == 204:
            return None
        _check(reply)
        return dict(reply.json())

    def verify(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Verify one job and post the answers; the server's verdict, or None when the lease
        was lost (another worker has the job)."""
        entry_id, lease = job["entry_id"], job["lease"]
        self.log(
            f"verify: entry {entry_id} ({job['protocol']} {job['shots']}-shot, "
            f"{len(job['questions'])} questions, {job['base_model']}, attempt {job['attempt']})"
        )
        beat = _Heartbeat(self, entry_id, lease, len(job["questions"]), job["lease_s"])
        beat.start()
        started = time.perf_counter()
        try:
            adapter_dir = self.fetch_adapter(job["adapter"])
            try:
                model, tokenizer = self.load(job, adapter_dir)
            except AdapterError as exc:
                return self.post(job, {"error": f"the adapter does not load: {exc}"}, started)
            answers = self.answer(job, model, tokenizer, beat)
            self.release(job, model, tokenizer)
        except LeaseLostError:
            self.log(f"verify: entry {entry_id}: lease lost to another worker; nothing posted")
            return None
        finally:
            beat.stop()
        return self.post(job, {"answers": answers}, started)

    def post(
        self, job: dict[str, Any], body: dict[str, Any], started: float
    ) -> dict[str, Any] | None:
        import torch

        import fedtune

        worker = {
            "seconds": round(time.perf_counter() - started, 2),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "dtype": self.dtype,
            "torch": torch.__version__,
            "fedtune": getattr(fedtune, "__version__", ""),
        }
        reply = self.client.post(
            f"{self.server}/api/verifications/{job['entry_id']}/result",
            json={"lease": job["lease"], "worker": worker, **body},
        )
        if reply.status_code == 409:
            self.log(f"verify: entry {job['entry_id']}: lease lost; the result was not recorded")
            return None
        _check(reply)
        verdict = dict(reply.json())
        self.log(
            f"verify: entry {job['entry_id']}: {verdict['status']} "
            f"({verdict['agreed']}/{verdict['sampled']} letters agree) in {worker['seconds']} s"
        )
        return verdict

    # --- the pieces

    def fetch_adapter(self, adapter: Mapping[str, Any]) -> Path:
        """The adapter as a PEFT folder in the cache (downloaded once, sha256 checked)."""
        sha256 = str(adapter["sha256"])
        folder = self.cache / "adapters" / sha256
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file() or file_sha256(weights) != sha256:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / (ADAPTER_WEIGHTS + ".part")
            digest = hashlib.sha256()
            with self.client.stream("GET", f"{self.server}/api/adapters/{sha256}") as reply:
                _check(reply)
                with open(partial, "wb") as handle:
                    for chunk in reply.iter_bytes(1 << 20):
                        digest.update(chunk)
                        handle.write(chunk)
            if digest.hexdigest() != sha256:
                partial.unlink()
                raise RuntimeError(f"the adapter downloaded has sha256 {digest.hexdigest()}")
            os.replace(partial, weights)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter["config"], indent=2))
        return folder

    def load(self, job: Mapping[str, Any], adapter_dir: Path) -> tuple[Any, Any]:
        """Base model + adapter, strictly (every tensor must fit); the base model is the one
        the previous job left (`release`) when it is the same location and dtype."""
        from fedtune.evaluation.adapters import AdapterSource, apply_adapter
        from fedtune.model.loading import load_model, load_tokenizer, resolve_model

        key = self._base_key(job)
        # Held by this job until `release` gives it back: a job that ends any other way drops it.
        cached, self._base = self._base, None
        if cached is not None and cached[0] == key:
            model, tokenizer = cached[1], cached[2]
        else:
            del cached  # the other model goes before this one loads
            source = resolve_model(key[0])
            tokenizer = load_tokenizer(source)
            model = load_model(source, dtype=self.dtype)
            self.loads += 1
        adapter = AdapterSource(adapter_dir, None, None, job["adapter"]["sha256"])
        wrapped = apply_adapter(model, adapter)
        wrapped.eval()
        return wrapped, tokenizer

    def _base_key(self, job: Mapping[str, Any]) -> tuple[str, str]:
        location = self.models.get(job["base_model"]) or job["model_location"]
        if not location:
            raise RuntimeError(f"no location for the base model {job['base_model']!r}")
        return str(location), self.dtype

    def release(self, job: Mapping[str, Any], model: Any, tokenizer: Any) -> None:
        """Take the job's adapter off (PEFT's `unload`, no merge) and keep the base model for
        the next job; if anything of the adapter is left, drop it instead."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = model.unload()
        if any(isinstance(module, BaseTunerLayer) for module in base.modules()):
            self.log("verify: the adapter did not come off the base model; it is reloaded next")
            return
        self._base = (self._base_key(job), base, tokenizer)

    def answer(
        self, job: Mapping[str, Any], model: Any, tokenizer: Any, beat: _Heartbeat
    ) -> list[dict[str, Any]]:
        """The entry's protocol on the sampled questions."""
        from fedtune.evaluation.api import run_protocol
        from fedtune.evaluation.progress import ProgressBar
        from fedtune.leaderboard.verification import NONE, question_index

        index = question_index()
        questions = [index[(str(s), int(i))] for s, i in job["questions"]]
        bar = (
            ProgressBar(len(questions), f"verify entry {job['entry_id']}")
            if self.show_progress
            else None
        )

        def progress(count: int) -> None:
            beat.advance(count)
            if bar is not None:
                bar(count)

        verdicts, details = run_protocol(
            model,
            tokenizer,
            questions,
            protocol=job["protocol"],
            shots=int(job["shots"]),
            on_progress=progress,
        )
        if bar is not None:
            bar.close()
        if job["protocol"] == "flowertune":
            return [
                {"subset": g.question.subject, "index": g.question.index, "output": g.output}
                for g in details["generations"]
            ]
        return [
            {"subset": v.question.subject, "index": v.question.index, "predicted": v.letter or NONE}
            for v in verdicts
        ]


class _Heartbeat:
    """Reports progress every third of the lease from a thread; notices a lost lease."""

    def __init__(self, worker: Worker, entry_id: int, lease: str, total: int, lease_s: float):
        self.worker, self.entry_id, self.lease, self.total = worker, entry_id, lease, total
        self.interval_s = max(1.0, min(30.0, lease_s / 3))
        self.done = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HTTP_TIMEOUT_S)

    def advance(self, count: int) -> None:
        """Questions finished; raises LeaseLostError once the server said the lease is gone."""
        self.done += count
        if self.lost:
            raise LeaseLostError(f"entry {self.entry_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reply = self.worker.client.post(
                    f"{self.worker.server}/api/verifications/{self.entry_id}/progress",
                    json={"lease": self.lease, "done": self.done, "total": self.total},
                )
            except httpx.HTTPError:
                continue  # the server may be restarting; the lease has room for a missed beat
            if reply.status_code == 409:
                self.lost = True
                return


def _check(reply: httpx.Response) -> None:
    if reply.status_code >= 400:
        reply.read()
        try:
            reason = reply.json().get("error", reply.text)
        except ValueError:
            reason = reply.text
        raise RuntimeError(
            f"{reply.request.method} {reply.request.url}: {reply.status_code} {reason}"
        )
