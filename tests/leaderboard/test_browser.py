"""The board in a real browser: Debian's headless Chromium driven by Playwright for Python.

Skipped (with the reason) only where Chromium or Playwright is absent; CI installs both with
scripts/install-browser. Screenshots (at 1360, 390 and 1280 px) and the hostile board's
measurements (measured-390.json, measured-1280.json) are written to $FEDTUNE_SCREENSHOT_DIR
(default: the test's tmp dir) so a person can look at them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from .lb_submissions import ADAPTER_BYTES, ADAPTER_SHA256, reproduce_pending

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
    live_server.store.put_adapter(ADAPTER_BYTES, ADAPTER_SHA256, "tests")
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
    reproduce_pending(live_server.store)  # a verifier re-generated its answers: ranked

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
    live_server.store.put_adapter(ADAPTER_BYTES, ADAPTER_SHA256, "tests")
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
    reproduce_pending(live_server.store)
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


def _too_wide(page, width: int = 390) -> list[str]:
    """The first elements that reach past a screen `width` px wide (for the failure message)."""
    return page.evaluate(
        f"""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > {width + 1})
            .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 8)"""
    )


# A board with the hostile cases: unbroken 45- and 60-character team names with 60-character base
# models, markup in a team name, and two costs far off every real one (1 byte, self-reported;
# 10^18 bytes, re-scored and so ranked).
LONG_TEAM = "Northwesternfederatedlanguagemodellingconsort"
LONG_TEAM_60 = "Internationalfederatedlearningbenchmarkworkinggroupforlangua"
LONG_MODEL = "Qwen2.5-7B-Instruct-federated-LoRA-r16-alpha32-merged-v2-fp8"
UNBROKEN_MODEL = "Qwen25SevenBInstructFederatedLoRAr16Alpha32MergedEpoch03FP16"
HOSTILE_TEAM = "<img src=x onerror=\"document.title='pwned'\">Evil & Co"

# Rendered size of SVG text in CSS px: the computed font size times the scale of the text's
# transform to the screen (viewBox scaling, rotation included); hidden SVGs are left out.
_SVG_TEXT_SIZES = """sel => [...document.querySelectorAll(sel)]
    .filter(t => t.getClientRects().length > 0 && t.getScreenCTM())
    .map(t => {
        const m = t.getScreenCTM();
        return {px: parseFloat(getComputedStyle(t).fontSize) * Math.hypot(m.a, m.b),
                text: t.textContent, cls: t.getAttribute('class') || '',
                svg: t.ownerSVGElement.id};
    })"""


def _post_hostile_board(live_server, submission) -> dict[str, int]:
    """Submits the hostile entries (`generations`: re-scored and reproduced, so ranked); their
    ids by key."""
    gb, small = 1024**3, "SmolLM2-135M-Instruct"
    live_server.store.put_adapter(ADAPTER_BYTES, ADAPTER_SHA256, "tests")
    for model in (LONG_MODEL, UNBROKEN_MODEL):  # on the board's list, so they can be verified
        live_server.store.set_base_model(model, "/models/elsewhere")
    ids = {}
    for key, team, model, comm_bytes, correct, generations in [
        ("long45", LONG_TEAM, LONG_MODEL, 2 * gb, (1300, 1400, 1800), True),
        ("long60", LONG_TEAM_60, UNBROKEN_MODEL, 3 * gb, (900, 900, 900), False),
        ("markup", HOSTILE_TEAM, small, int(1.2 * gb), (500, 500, 500), False),
        ("one-byte", "One Byte", small, 1, (900, 900, 900), False),
        ("exabyte", "Exabyte", small, 10**18, (900, 900, 900), True),
    ]:
        payload = submission(
            team,
            correct=correct,
            comm_bytes=comm_bytes,
            generations=generations,
            base_model=model,
        )
        reply = httpx.post(
            f"{live_server.url}/api/entries",
            json=payload,
            headers={"Authorization": f"Bearer {live_server.store.new_token(team)}"},
        )
        assert reply.status_code == 201, reply.text
        ids[key] = reply.json()["id"]
    reproduce_pending(live_server.store)
    return ids


@pytest.mark.parametrize("width", [390, 1280])
def test_hostile_board_at_phone_and_desktop_widths(
    browser, live_server, submission, tmp_path, width
):
    """Long unbroken names, markup and far-off costs at 390 and 1280 px: the page never scrolls
    sideways; Average (and at 1280 every category and the Date) stays in view; long names wrap
    or are cut with the whole name in a tooltip; the chart's scale comes from the real entries,
    the far-off ones drawn at its edge; every chart text (board and entry page) is ≥ 11 CSS px."""
    ids = _post_hostile_board(live_server, submission)
    assert len(LONG_TEAM) == 45 and len(LONG_TEAM_60) == len(LONG_MODEL) == 60
    assert len(UNBROKEN_MODEL) == 60
    page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=2)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    measured: dict[str, object] = {"viewport": width}
    page.goto(live_server.url + "/")

    # The page and the table: no sideways scroll.
    measured["page_width"] = page.evaluate("document.documentElement.scrollWidth")
    wrap = page.eval_on_selector(
        ".table-wrap",
        "w => ({scroll: w.scrollWidth, client: w.clientWidth,"
        " right: w.getBoundingClientRect().right})",
    )
    measured["table_width"] = page.eval_on_selector("#board", "t => t.scrollWidth")
    assert measured["page_width"] <= width, _too_wide(page, width)
    assert wrap["scroll"] <= wrap["client"], measured
    shown = ["average"] if width < 640 else ["average", "stem", "social", "humanities", "date"]
    for key in shown:
        box = page.locator(f"#board th[data-key={key}]").bounding_box()
        assert box is not None and box["x"] + box["width"] <= min(width, wrap["right"]), key
    # Every row's Average cell is in view, the long-name rows' included.
    average_index = page.eval_on_selector_all(
        "#board thead th", "ths => ths.findIndex(th => th.dataset.key === 'average')"
    )
    rights = page.eval_on_selector_all(
        "#board tbody tr",
        f"rows => rows.map(r => r.cells[{average_index}].getBoundingClientRect().right)",
    )
    measured["average_right_max"] = max(rights)
    assert max(rights) <= min(width, wrap["right"]), measured

    # Long names: wrapped inside their cell or cut with an ellipsis, the whole name as a tooltip.
    for key, team in (("long45", LONG_TEAM), ("long60", LONG_TEAM_60)):
        name = page.locator(f"#board tr[data-id='{ids[key]}'] a.name")
        assert name.get_attribute("title") == team and name.inner_text() == team
        box = name.bounding_box()
        assert box is not None and box["x"] + box["width"] <= width
    markup = page.locator(f"#board tr[data-id='{ids['markup']}'] a.name")
    assert markup.inner_text() == HOSTILE_TEAM and markup.get_attribute("title") == HOSTILE_TEAM
    assert page.locator("#board img").count() == 0 and page.title() == "fedtune leaderboard"
    clip = page.locator(f"#board tr[data-id='{ids['long45']}'] .clip")
    assert clip.get_attribute("title") == LONG_MODEL
    if width >= 640:  # the base model column: cut to one line; a click shows it whole
        cut = "c => c.scrollWidth > c.clientWidth"
        assert clip.evaluate(cut)
        clip.click()
        assert not clip.evaluate(cut) and clip.inner_text() == LONG_MODEL
        assert page.eval_on_selector(".table-wrap", "w => w.scrollWidth <= w.clientWidth")
        clip.click()
    else:
        assert clip.is_hidden()  # on a phone the base model is on the entry page

    # The chart: its scale comes from the real entries, which spread over most of its width; the
    # 1-byte and 10^18-byte entries sit at the frame's left and right edges, marked off-scale.
    chart = "#score-chart-compact" if width < 640 else "#score-chart"
    assert page.locator(chart).is_visible()
    frame = page.locator(f"{chart} rect.plot-area").bounding_box()
    points = page.eval_on_selector_all(
        f"{chart} circle.pt[data-id]",
        """cs => cs.map(c => { const b = c.getBoundingClientRect();
            return {id: Number(c.dataset.id), x: b.x + b.width / 2, w: b.width,
                    off: c.classList.contains('off-scale')}; })""",
    )
    assert len(points) == 19 + 5
    far = {ids["one-byte"], ids["exabyte"]}
    real = [p["x"] for p in points if p["id"] not in far]
    measured["real_spread"] = round((max(real) - min(real)) / frame["width"], 3)
    assert measured["real_spread"] >= 0.6, measured
    edge = {p["id"]: p for p in points if p["id"] in far}
    assert all(p["off"] for p in edge.values()) and not any(
        p["off"] for p in points if p["id"] not in far
    )
    assert frame["x"] <= edge[ids["one-byte"]]["x"] <= frame["x"] + 0.05 * frame["width"]
    right = frame["x"] + frame["width"]
    assert right - 0.05 * frame["width"] <= edge[ids["exabyte"]]["x"] <= right
    assert page.locator(f"{chart} path.off-mark").count() == 2
    note = " ".join(
        page.eval_on_selector_all(f"{chart} text.off-note", "ts => ts.map(t => t.textContent)")
    )
    assert "Off the scale" in note and "◀ 1 entry below" in note and "▶ 1 entry above" in note
    measured["point_width_min"] = round(min(p["w"] for p in points), 2)
    if width < 640:
        assert measured["point_width_min"] >= 12  # big enough to tap

    # Every chart text on the board as drawn: ≥ 11 CSS px.
    sizes = page.evaluate(f"({_SVG_TEXT_SIZES})('svg.chart text')")
    smallest = min(sizes, key=lambda s: s["px"])
    measured["board_chart_text_min_px"] = round(smallest["px"], 2)
    assert smallest["px"] >= 11, smallest
    assert page.locator(f"{chart} text.pt-label").count() >= 3  # the front is named
    page.screenshot(path=str(_shot_dir(tmp_path) / f"hostile-board-{width}.png"), full_page=True)

    # The long-name entry's page: no sideways scroll, the whole name, readable charts.
    page.goto(f"{live_server.url}/entry/{ids['long45']}")
    page.wait_for_selector("#entry-title")
    measured["entry_page_width"] = page.evaluate("document.documentElement.scrollWidth")
    assert measured["entry_page_width"] <= width, _too_wide(page, width)
    assert LONG_TEAM in page.inner_text("#entry-title")
    suffix = "-compact" if width < 640 else ""
    other = "" if suffix else "-compact"
    for chart_id in ("comm-chart", "loss-chart", "letter-chart"):
        assert page.locator(f"#{chart_id}{suffix}").is_visible(), chart_id
        assert page.locator(f"#{chart_id}{other}").is_hidden(), chart_id  # one version shows
    sizes = page.evaluate(f"({_SVG_TEXT_SIZES})('svg.chart text')")
    assert len(sizes) > 20
    smallest = min(sizes, key=lambda s: s["px"])
    measured["entry_chart_text_min_px"] = round(smallest["px"], 2)
    assert smallest["px"] >= 11, smallest
    page.screenshot(path=str(_shot_dir(tmp_path) / f"hostile-entry-{width}.png"), full_page=True)
    assert not errors
    (_shot_dir(tmp_path) / f"measured-{width}.json").write_text(json.dumps(measured, indent=1))
    page.close()
