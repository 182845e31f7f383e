"""The board in a real browser: Debian's headless Chromium driven by Playwright for Python.

Skipped (with the reason) only where Chromium or Playwright is absent; CI installs both with
scripts/install-browser. The screenshot is written to $FEDTUNE_SCREENSHOT_DIR (default: the test's
tmp dir) so a person can look at it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = os.environ.get("FEDTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
        reason=f"no Chromium at {CHROMIUM} (run scripts/install-browser)",
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright for Python is not installed (scripts/install-browser)",
    )
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=CHROMIUM_ARGS,
        )
        yield instance
        instance.close()


def _column(page, key: str) -> list[str]:
    index = page.eval_on_selector_all(
        "#board thead th", f"ths => ths.findIndex(th => th.dataset.key === '{key}')"
    )
    return page.eval_on_selector_all(
        "#board tbody tr", f"rows => rows.map(r => r.cells[{index}].innerText.trim())"
    )


def test_board_in_browser(browser, live_server, submission, tmp_path):
    # An open-track run that beats the always-D reference but not the top entries (re-scored
    # from its generation files), and a self-reported entry whose team name tries to inject
    # markup: it must appear as text, unranked, and never run.
    hostile = "<img src=x onerror=\"document.title='pwned'\">Evil & Co"
    for team, correct, gb, files in [
        ("fedtune demo", (1300, 1400, 1800), 0.004, True),
        (hostile, (500, 500, 500), 1.2, False),
    ]:
        payload = submission(team, correct=correct, comm_bytes=int(gb * 1024**3), generations=files)
        reply = httpx.post(
            f"{live_server.url}/api/entries",
            json=payload,
            # One token per team: a token is bound to the team of its first entry.
            headers={"Authorization": f"Bearer {live_server.store.new_token(team)}"},
        )
        assert reply.status_code == 201, reply.text

    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(live_server.url + "/")

    # Row order: ranks ascending; constant-answer rows sit among the entries by their Average;
    # the self-reported entry comes last, without a rank.
    averages = [float(v) for v in _column(page, "average")]
    assert averages[:-1] == sorted(averages[:-1], reverse=True)
    ranks = [r for r in _column(page, "rank") if r != "ref"]
    assert ranks == [*(str(i) for i in range(1, len(ranks))), "—"]
    teams = _column(page, "team")
    assert teams[0].startswith("ZeroOne.AI") and teams[-1].startswith(hostile)
    demo = next(i for i, t in enumerate(teams) if t.startswith("fedtune demo"))
    always_d = teams.index("Reference: always D")
    assert demo < always_d  # 41.6 Average ranks above the best constant answer (27.95)
    assert any(t.startswith(hostile) for t in teams)  # shown literally
    assert page.title() == "fedtune leaderboard" and not dialogs and not errors
    assert page.locator("#board img").count() == 0

    # The chart: one point per entry, the Pareto front, the reference band.
    assert page.locator("#score-chart").is_visible()
    assert page.locator("#score-chart circle.pt[data-id]").count() == 19 + 2
    assert page.locator("#pareto-front").count() == 1
    on_front = page.eval_on_selector_all(
        "#score-chart circle.on-front", "cs => cs.map(c => c.dataset.id)"
    )
    demo_id = page.locator("#board tbody tr", has_text="fedtune demo").get_attribute("data-id")
    assert demo_id in on_front  # the cheapest run is on the front by construction
    page.screenshot(path=str(_shot_dir(tmp_path) / "leaderboard.png"), full_page=True)

    # Sorting: Comm. Costs ascending on the second click; then STEM descending on the first.
    page.click("#board th[data-key=comm] button")
    page.click("#board th[data-key=comm] button")
    assert page.get_attribute("#board th[data-key=comm]", "aria-sort") == "ascending"
    costs = page.eval_on_selector_all(
        "#board tbody tr", "rows => rows.map(r => parseFloat(r.cells[4].dataset.v))"
    )
    assert costs == sorted(costs)
    assert _column(page, "team")[0].startswith("Reference")  # references cost nothing
    page.click("#board th[data-key=stem] button")
    stems = [float(v) for v in _column(page, "stem")]
    assert stems == sorted(stems, reverse=True) and stems[0] == 66.22

    # Filter by track (the form submits itself on change): only the two open entries remain.
    page.select_option("#track-filter", "open")
    page.wait_for_url("**track=open**")
    entry_rows = page.locator("#board tbody tr.entry")
    assert entry_rows.count() == 2
    assert _column(page, "rank")[0] == "1"

    # The entry page: per-subject table, per-round plots, answer letters.
    page.click("#board a:text('fedtune demo')")
    page.wait_for_selector("#entry-title")
    assert page.locator("#subjects tbody tr").count() == 44
    assert page.locator("#comm-chart rect.bar").count() >= 6
    assert page.locator("#loss-chart polyline").count() == 1
    assert page.locator("#letter-chart").is_visible()
    page.screenshot(path=str(_shot_dir(tmp_path) / "entry.png"), full_page=True)
    assert not errors
    page.close()


def _shot_dir(tmp_path: Path) -> Path:
    path = Path(os.environ.get("FEDTUNE_SCREENSHOT_DIR", tmp_path))
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_board_on_a_phone(browser, live_server, submission, tmp_path):
    """At 390 px: no sideways scroll of the page, the compact chart with readable text and tappable
    points, the Average in view; no console error on the board or an entry page."""
    for team, correct, gb in [
        ("Phone Check", (1300, 1400, 1800), 0.004),
        ("Other", (900, 900, 900), 3),
    ]:
        reply = httpx.post(
            f"{live_server.url}/api/entries",
            json=submission(
                team, correct=correct, comm_bytes=int(gb * 1024**3), generations=team != "Other"
            ),
            headers={"Authorization": f"Bearer {live_server.store.new_token(team)}"},
        )
        assert reply.status_code == 201, reply.text
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))

    def page_width() -> int:
        return page.evaluate("document.documentElement.scrollWidth")

    page.goto(live_server.url + "/")
    assert page_width() <= 390, _too_wide(page)
    assert page.locator("#score-chart-compact").is_visible()
    assert not page.locator("#score-chart").is_visible()
    # Chart text as rendered on the screen, in CSS pixels: readable, not ~4 px.
    tick_height = page.eval_on_selector(
        "#score-chart-compact text.tick", "t => t.getBoundingClientRect().height"
    )
    assert tick_height >= 11
    # Points are links big enough to tap (≥ 12 CSS px across).
    point = page.locator("#score-chart-compact circle.pt[data-id]").first.bounding_box()
    assert point["width"] >= 12
    labels = page.eval_on_selector_all(
        "#score-chart-compact text.pt-label", "ts => ts.map(t => t.textContent)"
    )
    assert "Phone Check" in labels  # the cheapest entry is on the front and named
    average = page.locator("#board th[data-key=average]").bounding_box()
    assert average is not None and average["x"] + average["width"] <= 390
    assert page.locator("#board th[data-key=stem]").is_hidden()
    page.screenshot(path=str(_shot_dir(tmp_path) / "phone-board.png"), full_page=True)
    page.click("#board a:text('Phone Check')")
    page.wait_for_selector("#entry-title")
    assert page_width() <= 390, _too_wide(page)
    page.screenshot(path=str(_shot_dir(tmp_path) / "phone-entry.png"), full_page=True)
    assert not errors
    page.close()


def _too_wide(page) -> list[str]:
    """The first elements that reach past a 390 px screen (for the failure message)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > 391)
            .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 8)"""
    )
