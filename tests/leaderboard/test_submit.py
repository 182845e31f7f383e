"""`fedtune leaderboard submit RUN_DIR` and `show`: from a run directory to a ranked entry."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main
from fedtune.leaderboard.store import Store

from .lb_rundir import always, make_run_dir, write_evaluation
from .lb_submissions import honest_answers

CODE = "https://github.com/example/fedtune"


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "board"


def submit(run, data_dir, *extra):
    return main(
        ["leaderboard", "submit", str(run), "--team", "Demo", "--code", CODE,
         "--data-dir", str(data_dir), *extra]
    )  # fmt: skip


def test_open_track_run_is_ranked_among_the_published_rows(tmp_path, data_dir, capsys):
    run = make_run_dir(tmp_path, answer=always("D"))
    assert submit(run, data_dir, "--track", "open") == 0
    out = capsys.readouterr().out
    # The run's evaluation wrote the official generation files: the board re-scores them.
    assert "entry 20 (pending): Demo · SmolLM2-135M-Instruct · Average 27.95" in out
    assert "not ranked until a verifier reproduces it" in out

    entry = Store.in_dir(data_dir).get(20)
    # An always-D evaluation scores exactly the always-D reference row.
    assert (round(entry.stem, 2), round(entry.social_sciences, 2), round(entry.humanities, 2)) == (
        28.61,
        31.07,
        24.17,
    )
    assert entry.comm_bytes == 3 * 2 * 2 * 1_958_400
    assert (
        entry.details["adapter"]["sha256"]
        == json.loads((run / "summary.json").read_text())["adapter_sha256"]
    )
    assert [r["train_loss"] for r in entry.details["rounds"]] == pytest.approx([1.8, 1.6, 1.4])
    assert entry.details["evaluation"]["answer_distribution"]["D"] == 3153 + 3077 + 4705
    assert entry.details["provenance"]["command"] == "fedtune run --set num-server-rounds=3"
    assert entry.details["provenance"]["config_digest"] == "0123456789abcdef"
    # Ranked once a verifier re-generates the same letters on the secret sample (scripted here).
    store = Store.in_dir(data_dir)
    job = store.claim_verification("scripted")
    store.finish_verification(20, job["lease"], honest_answers(store, job), {})
    assert store.get(20).status == "reproduced"

    assert main(["leaderboard", "show", "--format", "json", "--data-dir", str(data_dir)]) == 0
    rows = json.loads(capsys.readouterr().out)
    ranked = [(r["rank"], r.get("team")) for r in rows if r["kind"] == "entry"]
    assert (13, "Demo") in ranked  # below ZJUDAI Llama-3.1-8B (31.49), above Baseline (21.68)
    assert main(["leaderboard", "show", "--data-dir", str(data_dir)]) == 0
    table = capsys.readouterr().out
    assert "  13  Demo " in table and "Open" in table
    assert main(["leaderboard", "show", "--track", "open", "--data-dir", str(data_dir)]) == 0
    assert "   1  Demo " in capsys.readouterr().out


def test_general_nlp_requires_the_rules(tmp_path, data_dir, capsys):
    sample = make_run_dir(tmp_path, name="sample")
    assert submit(sample, data_dir) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Alpaca-GPT4" in err and "--track open" in err
    ten = make_run_dir(tmp_path, name="ten", data_name="flwrlabs/alpaca-gpt4", num_clients=10)
    assert submit(ten, data_dir) == 2
    assert "20 clients" in capsys.readouterr().err
    official = make_run_dir(tmp_path, name="official", data_name="flwrlabs/alpaca-gpt4")
    assert submit(official, data_dir) == 0
    assert Store.in_dir(data_dir).get(20).track == "general-nlp"


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _refusals(tmp_path):
    """(name, run directory, expected reason) for runs that must be refused."""
    cases = []

    def case(name, reason, edit):
        run = make_run_dir(tmp_path, name=name)
        edit(run)
        cases.append((name, run, reason))

    case("no-ledger", "no communication ledger", lambda r: (r / "ledger.jsonl").unlink())
    case(
        "ledger-summary",
        "ledger and summary disagree",
        lambda r: _edit_json(
            r / "summary.json",
            communication={"downlink_bytes": 1, "uplink_bytes": 1, "total_bytes": 2},
        ),
    )
    case(
        "ledger-gap",
        "does not cover rounds",
        lambda r: (r / "ledger.jsonl").write_text(
            "".join(line + "\n" for line in (r / "ledger.jsonl").read_text().splitlines()[:-2])
        ),
    )
    case(
        "metrics-ledger",
        "metrics.jsonl round 1",
        lambda r: (r / "metrics.jsonl").write_text(
            json.dumps({"round": 1, "downlink_bytes": 5, "uplink_bytes": 5}) + "\n"
        ),
    )
    case("bad-ledger-line", "not JSON", lambda r: (r / "ledger.jsonl").write_text("{oops\n"))
    case(
        "adapter-changed",
        "the adapter changed after the run",
        lambda r: (r / "adapter" / "adapter_model.safetensors").write_bytes(b"other"),
    )
    case(
        "other-adapter",
        "evaluation is of another adapter",
        lambda r: _replace_eval(
            r, adapter=make_run_dir(tmp_path, name="other", evaluate=False, seed=1)
        ),
    )
    case("base-model-only", "base model alone", lambda r: _replace_eval(r, adapter=None))
    case("partial-eval", "partial evaluation", lambda r: _replace_eval(r, limit_per_subject=5))
    case("partial-unflagged", "partial evaluation", _partial_unflagged)
    case("no-eval", "evaluate the run first", lambda r: _rmtree(r / "eval"))
    case(
        "eval-unknown-field",
        "not an evaluation result file: extra_key: Extra inputs are not permitted",
        lambda r: _edit_json(_eval_file(r), extra_key=1),
    )
    case("eval-metrics-layout", "n_questions: Field required", _metrics_layout)
    case(
        "eval-other-name",
        "no evaluation results (mmlu_*_*shot_*.json)",
        lambda r: _eval_file(r).rename(r / "eval" / "results.json"),
    )
    case("running", "has not finished", lambda r: _edit_json(r / "status.json", state="running"))
    return cases


def _replace_eval(run, **kwargs):
    _rmtree(run / "eval")
    write_evaluation(run, always("A"), **kwargs)


def _eval_file(run):
    return next((run / "eval").glob("mmlu_*.json"))


def _partial_unflagged(run):
    """A partial evaluation whose file claims to be complete: the question counts give it away."""
    _replace_eval(run, limit_per_subject=5)
    _edit_json(_eval_file(run), partial=False)


def _metrics_layout(run):
    """The metrics moved under a `metrics` key: a layout nothing writes, so nothing reads."""
    path = _eval_file(run)
    doc = json.loads(path.read_text())
    keys = ("n_questions", "average", "board", "categories", "subjects", "predicted_letters")
    doc["metrics"] = {k: doc.pop(k) for k in keys}
    path.write_text(json.dumps(doc))


def _rmtree(path):
    import shutil

    shutil.rmtree(path)


def test_runs_that_do_not_add_up_are_refused(tmp_path, data_dir, capsys):
    for name, run, reason in _refusals(tmp_path):
        assert submit(run, data_dir, "--track", "open") == 2, name
        err = capsys.readouterr().err
        assert "refused" in err and reason in err, (name, err)
    assert Store.in_dir(data_dir).count() == 19  # nothing stored


def test_submit_to_a_server_and_dry_run(tmp_path, live_server, capsys):
    run = make_run_dir(tmp_path, answer=always("B"))
    assert submit(run, tmp_path / "unused", "--track", "open", "--dry-run") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["scores"]["stem"] == pytest.approx(100 * 753 / 3153)
    # The generation files travel with the submission; the dry run shows their size only.
    assert payload["generations"]["stem"].endswith("base64 characters>")
    args = ["--track", "open", "--server", live_server.url, f"--token={live_server.token}"]
    assert submit(run, tmp_path / "unused", *args) == 0
    assert "not ranked until a verifier reproduces it" in capsys.readouterr().out
    stored = live_server.store.get(20)
    assert stored.team == "Demo" and stored.status == "pending"
    # The adapter went up first: the board holds the run's weights, byte for byte.
    weights = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert b"".join(live_server.store.read_adapter(stored.details["adapter"]["sha256"])) == weights
    assert submit(run, tmp_path / "unused", *args) == 2  # the same run again
    assert "409" in capsys.readouterr().err
    bad = ["--track", "open", "--server", live_server.url, "--token", "wrong"]
    assert submit(run, tmp_path / "unused", *bad) == 2
    assert "401" in capsys.readouterr().err


def test_cli_get_token(tmp_path, data_dir, capsys):
    run = make_run_dir(tmp_path)
    assert submit(run, data_dir, "--track", "open") == 0
    capsys.readouterr()
    assert main(["leaderboard", "get", "20", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["status"] == "pending"
    assert main(["leaderboard", "get", "99", "--data-dir", str(data_dir)]) == 2
    assert main(["leaderboard", "token", "team-x", "--data-dir", str(data_dir)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert Store.in_dir(data_dir).token_owner(token).startswith("team-x (")
    assert Store.in_dir(data_dir).token_role(token) == "submitter"
    assert main(["leaderboard", "token", "ops", "--operator", "--data-dir", str(data_dir)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert Store.in_dir(data_dir).token_role(token) == "operator"


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_allow_partial_checks_everything_and_stores_nothing(tmp_path, data_dir, capsys):
    run = make_run_dir(tmp_path, name="partial")
    _replace_eval(run, limit_per_subject=5)
    before = _files(run)
    args = ["--track", "open", "--dry-run", "--allow-partial"]
    assert submit(run, data_dir, *args) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert "partial evaluation: would be refused" in captured.err
    assert "nothing was stored" in captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert payload["adapter"] == {
        "location": str(run / "adapter"),
        "sha256": summary["adapter_sha256"],
        "config": json.loads((run / "adapter" / "adapter_config.json").read_text()),
    }
    assert payload["communication"]["total_bytes"] == summary["communication"]["total_bytes"]
    assert payload["provenance"]["run"] == "partial"
    assert payload["provenance"]["evaluation_file"].startswith("eval/mmlu_flowertune_0shot")
    assert set(payload["scores"]) == {"stem", "social_sciences", "humanities"}
    assert sum(c["total"] for c in payload["evaluation"]["subjects"].values()) < 10_000
    assert _files(run) == before  # the run directory is untouched
    assert not data_dir.exists()

    # Partial by the question counts alone (the file claims to be complete): the same note.
    unflagged = make_run_dir(tmp_path, name="unflagged")
    _partial_unflagged(unflagged)
    assert submit(unflagged, data_dir, *args) == 0
    assert "partial evaluation: would be refused" in capsys.readouterr().err

    # A complete evaluation: no note.
    assert submit(make_run_dir(tmp_path, name="complete"), data_dir, *args) == 0
    assert "partial" not in capsys.readouterr().err


def test_allow_partial_still_refuses_what_else_does_not_add_up(tmp_path, data_dir, capsys):
    def partial(name, edit=lambda run: None, **evaluation):
        run = make_run_dir(tmp_path, name=name)
        _replace_eval(run, limit_per_subject=5, **evaluation)
        edit(run)
        return run

    cases = [
        (
            partial(
                "adapter-changed",
                lambda r: (r / "adapter" / "adapter_model.safetensors").write_bytes(b"other"),
            ),
            "the adapter changed after the run",
        ),
        (
            partial(
                "other-adapter", adapter=make_run_dir(tmp_path, name="x", evaluate=False, seed=1)
            ),
            "evaluation is of another adapter",
        ),
        (partial("base-model-only", adapter=None), "base model alone"),
        (
            partial("unknown-field", lambda r: _edit_json(_eval_file(r), extra_key=1)),
            "extra_key: Extra inputs are not permitted",
        ),
        (
            partial(
                "ledger-summary",
                lambda r: _edit_json(
                    r / "summary.json",
                    communication={"downlink_bytes": 1, "uplink_bytes": 1, "total_bytes": 2},
                ),
            ),
            "ledger and summary disagree",
        ),
    ]
    for run, reason in cases:
        assert submit(run, data_dir, "--track", "open", "--dry-run", "--allow-partial") == 2
        err = capsys.readouterr().err
        assert "refused" in err and reason in err, (run.name, err)

    run = partial("stored")
    assert submit(run, data_dir, "--track", "open", "--allow-partial") == 2
    assert "--allow-partial goes with --dry-run only" in capsys.readouterr().err
    assert not data_dir.exists()


def test_a_loglik_evaluation_is_submitted_with_its_predictions_and_recounted(
    tmp_path, data_dir, capsys
):
    run = make_run_dir(tmp_path, name="loglik", evaluate=False)
    write_evaluation(run, always("C"), protocol="loglik", shots=5)
    written = sorted(p.name for p in (run / "eval").iterdir())
    assert "predictions_mmlu_loglik_5shot_loglik.jsonl" in written
    assert submit(run, data_dir, "--track", "open") == 0
    assert "(pending)" in capsys.readouterr().out
    entry = Store.in_dir(data_dir).get(20)
    assert entry.status == "pending" and entry.details["evaluation"]["protocol"] == "loglik"
    # Always C scores exactly the always-C reference row.
    assert round(entry.average, 2) == 25.72


def test_a_dp_run_shows_its_recomputed_privacy_on_the_entry(tmp_path, data_dir, capsys):
    from types import SimpleNamespace

    from fedtune.federation.privacy import privacy_spent

    dp = SimpleNamespace(noise="server", noise_multiplier=0.8, clipping_norm=0.1, delta=1e-5,
                         accounting="no-amplification")  # fmt: skip
    spent = privacy_spent(dp, 20, [2, 2, 2])
    run = make_run_dir(tmp_path, answer=always("D"), privacy=spent)
    assert submit(run, data_dir, "--track", "open") == 0
    capsys.readouterr()
    privacy = Store.in_dir(data_dir).get(20).details["setup"]["privacy"]
    assert privacy["epsilon"] == spent["epsilon"] and privacy["releases"] == [2, 2, 2]
    assert main(["leaderboard", "show", "--format", "json", "--data-dir", str(data_dir)]) == 0
    # A run whose summary claims another ε is refused before anything is stored.
    other = make_run_dir(tmp_path, name="other", answer=always("C"),
                         privacy={**spent, "epsilon": spent["epsilon"] + 1})  # fmt: skip
    assert submit(other, data_dir, "--track", "open") != 0
    assert "the accountant gives" in capsys.readouterr().err
