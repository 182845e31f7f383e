"""The run directory's disk fills up, then turns read-only, under a real run: each time the run
ends with a true status (or, when even status.json cannot be written, the dead-process state
`--resume` recognises), a clear message and no process behind; once the disk is usable again,
`--resume` finishes with the uninterrupted run's bits and each round once in every log."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from harness import Run, check_resumed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of the test's own (mounting needs root; elsewhere the test is skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        _mount("-o", "remount,rw", str(disk))
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def _fill(disk) -> None:
    """Write until the disk refuses another byte."""
    with open(disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    try:  # top up the last partial page
        with open(disk / "filler", "ab") as handle:
            while True:
                handle.write(b"\0" * 512)
                handle.flush()
    except OSError:
        pass


def _remount_read_only(disk) -> None:
    """tmpfs refuses `ro` while a file is open for writing: retry until the run closes it."""
    deadline = time.monotonic() + 30
    while (done := _mount("-o", "remount,ro", str(disk))).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.05)


def test_full_then_read_only_disk_end_honestly_and_resume(
    small_disk, reference_run, tiny_model_dir_module
):
    reference = reference_run("fedavg")

    # 1. The disk fills after round 1: the next checkpoint cannot be written.
    run = Run(small_disk, "disk", tiny_model_dir_module)
    run.wait_for(lambda: run.metrics_lines() >= 1)
    _fill(small_disk)
    code, err = run.wait(timeout=180)
    assert code != 0, err[-3000:]
    status = run.status()
    assert status["state"] == "failed" and status["resumable"] is True, status
    assert "No space left on device" in status["error"]
    assert "No space left on device" in err and f"--resume {run.dir}" in err
    assert not list((run.dir / "checkpoints").glob(".*.tmp-*")), "half-written staging kept"
    assert run.leftovers() == []

    # 2. Space again; the resumed run's disk turns read-only after one new round: not even
    #    status.json can be written. The run still ends, says why, and leaves nothing behind.
    (small_disk / "filler").unlink()
    resumed = Run(small_disk, "disk", tiny_model_dir_module, resume=True)
    before = status["rounds_completed"]
    # Once the resumed run says "running" its logs are cut back to round `before`; then one
    # new round.
    resumed.wait_for(lambda: resumed.status()["state"] == "running")
    resumed.wait_for(lambda: resumed.metrics_lines() >= before + 1)
    _remount_read_only(small_disk)
    code, err = resumed.wait(timeout=180)
    assert code != 0, err[-3000:]
    assert "Read-only file system" in err and "without recording how" in err, err[-3000:]
    assert resumed.leftovers() == []
    assert resumed.status()["state"] == "running"  # its process is gone: --resume accepts it

    # 3. Writable again: --resume finishes with the uninterrupted run's bits.
    assert _mount("-o", "remount,rw", str(small_disk)).returncode == 0
    final = Run(small_disk, "disk", tiny_model_dir_module, resume=True)
    code, err = final.wait()
    assert code == 0, err[-3000:]
    check_resumed(final.dir, reference)
