"""Spot-check verification end to end on the embedded model: honest entries are reproduced, doctored
ones fail, and what a verification costs.

    fedtune run (the default job, seed 2024; and seed 2025 for a second adapter)
    → fedtune eval --adapter RUN (the board protocol) and --protocol loglik, on all 10,935 questions
    → fedtune leaderboard serve; submit --server both evaluations (adapter uploaded first)
    → the same outputs with the gold letters; the same outputs claimed for the seed-2025 adapter
    → fedtune leaderboard verify --once (fp32, the verifier's default on a CPU): the verdicts
    → the honest entries verified again in bf16 (a verifier on other hardware, other precision):
      how many letters a change of precision flips — what the agreement threshold must allow.

Every step that left its output is skipped when the script runs again (the evaluations take ~35 min
each on a 2-core CPU), so it can be resumed. Writes JSON (default bench/results/verify_e2e.json).

    .venv/bin/python bench/verify_e2e.py --work /work/bench-runs/verify-e2e
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from leaderboard_load import Server, free_port  # noqa: E402  (beside it)

sys.path.insert(0, str(ROOT / "tests" / "leaderboard"))
from lb_submissions import gold_letters  # noqa: E402  (the test suite's doctored submission)

from fedtune.rundir import SUMMARY_FILE  # noqa: E402

TEAM_CODE = "https://github.com/fedtune/fedtune"


def fedtune(*args: str, log: Path) -> float:
    """Run a fedtune command (output appended to `log`); its wall seconds."""
    started = time.monotonic()
    with open(log, "ab") as handle:
        handle.write(f"\n$ fedtune {' '.join(args)}\n".encode())
        handle.flush()
        done = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", *args], stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise SystemExit(f"fedtune {args[0]} failed ({done.returncode}); see {log}")
    return time.monotonic() - started


def train(work: Path, name: str, seed: int, log: Path) -> tuple[Path, float | None]:
    run = work / "runs" / name
    if (run / SUMMARY_FILE).is_file():
        return run, None
    seconds = fedtune(
        "run", "--set", f"run.output-dir={work / 'runs'}", "--set", f"run.name={name}",
        "--set", f"train.seed={seed}", log=log,
    )  # fmt: skip
    return run, seconds


def evaluate(run: Path, protocol: str, log: Path) -> tuple[Path, float | None]:
    pattern = (
        "mmlu_flowertune_0shot_*.json" if protocol == "flowertune" else "mmlu_loglik_0shot_*.json"
    )
    found = sorted((run / "eval").glob(pattern)) if (run / "eval").is_dir() else []
    if found:
        return found[0], None
    seconds = fedtune(
        "eval", "--adapter", str(run), "--protocol", protocol, "--no-progress", log=log
    )
    return sorted((run / "eval").glob(pattern))[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-verify-e2e"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/verify_e2e.json")
    parser.add_argument("--skip-bf16", action="store_true", help="no bf16 re-verification")
    parser.add_argument(
        "--protocols", default="flowertune,loglik", help="which evaluations to make and verify"
    )
    args = parser.parse_args()
    import httpx

    from fedtune.leaderboard.runs import build_submission
    from fedtune.leaderboard.store import Store
    from fedtune.provenance import file_sha256

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    seconds: dict[str, float | None] = {}
    honest, seconds["train"] = train(work, "honest", 2024, log)
    other, seconds["train_other"] = train(work, "other-seed", 2025, log)
    evals = {}
    for protocol in args.protocols.split(","):
        evals[protocol], seconds[f"eval_{protocol}"] = evaluate(honest, protocol, log)
        print(f"{protocol}: {evals[protocol]} ({seconds[f'eval_{protocol}']} s)", flush=True)

    board = work / f"board-{int(time.time())}"
    store = Store.in_dir(board)
    operator = store.new_token("verifier", role="operator")
    server = Server(board, free_port(), work / "server.log")
    server.start()
    ids: dict[str, int] = {}
    try:
        for protocol, results in evals.items():
            payload = build_submission(
                honest, team=f"honest {protocol}", code_url=TEAM_CODE, track="open",
                eval_name=str(results),
            )  # fmt: skip
            variants = {
                f"honest {protocol}": payload,
                f"gold {protocol}": {**gold_letters(payload), "team": f"gold {protocol}"},
            }
            weights = other / "adapter" / "adapter_model.safetensors"
            config = json.loads((other / "adapter" / "adapter_config.json").read_text())
            variants[f"other-adapter {protocol}"] = {
                **payload, "team": f"other-adapter {protocol}",
                "adapter": {"location": str(other / "adapter"), "sha256": file_sha256(weights),
                            "config": config},
            }  # fmt: skip
            for team, body in variants.items():
                token = store.new_token(team, team=team)
                adapter = Path(body["adapter"]["location"]) / "adapter_model.safetensors"
                put = httpx.put(
                    f"{server.url}/api/adapters/{body['adapter']['sha256']}",
                    content=adapter.read_bytes(),
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=120,
                )
                assert put.status_code in (200, 201), put.text
                reply = httpx.post(
                    f"{server.url}/api/entries", json={**body, "team": team},
                    headers={"Authorization": f"Bearer {token}"}, timeout=120,
                )  # fmt: skip
                assert reply.status_code == 201, reply.text
                ids[team] = reply.json()["id"]
        started = time.monotonic()
        fedtune("leaderboard", "verify", "--server", server.url, f"--token={operator}", "--once",
                "--no-progress", "--cache-dir", str(work / "cache"), log=log)  # fmt: skip
        seconds["verify_all_fp32"] = time.monotonic() - started
        verdicts = {team: store.get(i).details["verification"] for team, i in ids.items()}
        bf16 = {}
        if not args.skip_bf16:
            for protocol in evals:
                store.requeue(ids[f"honest {protocol}"], "bench", "bf16 re-verification")
            started = time.monotonic()
            fedtune("leaderboard", "verify", "--server", server.url, f"--token={operator}",
                    "--once", "--no-progress", "--dtype", "bfloat16", "--cache-dir",
                    str(work / "cache"), log=log)  # fmt: skip
            seconds["verify_honest_bf16"] = time.monotonic() - started
            bf16 = {p: store.get(ids[f"honest {p}"]).details["verification"] for p in evals}
    finally:
        server.stop()

    def brief(record: dict[str, Any]) -> dict[str, Any]:
        keep = ("status", "sampled", "agreed", "agreement", "submitted_correct",
                "regenerated_correct", "threshold")  # fmt: skip
        return {**{k: record.get(k) for k in keep}, "worker_seconds": record["worker"]["seconds"]}

    result = {
        "benchmark": "verify_e2e",
        "what": "embedded model: honest, gold-letter and swapped-adapter entries verified",
        "protocols": list(evals),
        "policy": store.policy().flat(),
        "seconds": seconds,
        "verdicts_fp32": {team: brief(r) for team, r in verdicts.items()},
        "honest_reverified_bf16": {p: brief(r) for p, r in bf16.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
