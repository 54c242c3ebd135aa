"""The web console in a real browser: Debian's Chromium driven by Playwright.

One browser for the whole walk (the slow part is starting it). Without Chromium or
Playwright the test is skipped with the reason, except under CI, where it must run.
Screenshots of each page go to the test's tmp folder (`CONSOLE_SCREENSHOTS` names another).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from console_setup import OPERATOR_LOGIN, QUOTA_USED_UP, VIEWER_LOGIN, running_console

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser_ready() -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run under CI: {reason}")
        pytest.skip(reason)


async def test_operator_and_viewer_walk_the_console_in_chromium(browser_ready, tmp_path, simulator):
    from playwright.async_api import async_playwright, expect

    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    async with (
        running_console(tmp_path, simulator) as console,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            # The viewer: sees everything, presses nothing, and a forged POST is refused.
            viewer = await browser.new_page()
            await _log_in(viewer, console.url, VIEWER_LOGIN)
            await viewer.goto(console.url + "/ui/actions?status=dead")
            await expect(viewer.locator("tr.action")).not_to_have_count(0)
            assert await viewer.get_by_role("button", name="Retry").count() == 0
            await viewer.screenshot(path=shots / "actions-viewer.png", full_page=True)
            dead_id = await viewer.locator("tr.action").first.get_attribute("data-id")
            forged = await viewer.request.post(
                console.url + f"/ui/actions/{dead_id}/discard", form={"back": "/ui/overview"}
            )
            assert forged.status == 403

            # The operator: a new event appears in the live list, and its trace opens.
            operator = await browser.new_page()
            await _log_in(operator, console.url, OPERATOR_LOGIN)
            await operator.screenshot(path=shots / "overview.png", full_page=True)
            sim = simulator.state.sims()[3]
            (used_up,) = simulator.state.store_events(
                [{"event_type": QUOTA_USED_UP, "sim_id": sim["id"]}]
            )
            # This event's row, not its suspension's echo (a later event on the same SIM
            # that the live list may show first).
            link = operator.locator(f"a[href='/ui/events/{used_up['id']}']")
            live = operator.locator("#decisions tr.live", has=link).first
            await expect(live).to_be_visible(timeout=15_000)
            await operator.screenshot(path=shots / "overview-live.png", full_page=True)
            await live.get_by_role("link").click()
            await expect(operator.locator("h1")).to_contain_text("Trace of event")
            await expect(operator.locator(".verdicts")).to_contain_text("quota")
            await expect(operator.locator(".verdicts")).to_contain_text("suspend_sim")
            steps = operator.locator(".verdicts .steps").first
            await expect(steps).to_contain_text(f"sim.iccid={sim['iccid']}")  # a value read
            await expect(steps).to_contain_text("1 of 1 within 10m")  # the threshold count
            await operator.screenshot(path=shots / "trace.png", full_page=True)

            # Retry the dead letter, and see it done.
            await operator.goto(console.url + "/ui/actions?status=dead")
            row = operator.locator(f'tr.action[data-id="{dead_id}"]')
            await row.get_by_role("button", name="Retry").click()
            await operator.goto(console.url + "/ui/actions?status=all")
            done = operator.locator(f'tr.action[data-id="{dead_id}"] td.status')
            for _ in range(50):
                if (await done.inner_text()) == "done":
                    break
                await operator.wait_for_timeout(100)
                await operator.reload()
            await expect(done).to_have_text("done")
            await operator.screenshot(path=shots / "actions-operator.png", full_page=True)

            # Release the action the guard held, one by one, and see it done.
            await operator.goto(console.url + "/ui/actions?status=held")
            held = operator.locator("tr.action").first
            held_id = await held.get_attribute("data-id")
            await operator.screenshot(path=shots / "actions-held.png", full_page=True)
            await held.get_by_role("button", name="Release").click()
            await operator.goto(console.url + "/ui/actions?status=all")
            released = operator.locator(f'tr.action[data-id="{held_id}"] td.status')
            for _ in range(50):
                if (await released.inner_text()) == "done":
                    break
                await operator.wait_for_timeout(100)
                await operator.reload()
            await expect(released).to_have_text("done")

            # The rules, with the tripped one's YAML; then resume it from the overview.
            await operator.goto(console.url + "/ui/rules")
            tripped = operator.locator("#rule-guarded")
            await expect(tripped.locator(".mode")).to_have_text("shadow (guard)")
            await tripped.locator("summary").click()
            await expect(tripped.locator("pre")).to_contain_text("max_actions")
            await operator.screenshot(path=shots / "rules.png", full_page=True)
            await operator.goto(console.url + "/ui/overview")
            guard = operator.locator("tr.guard", has_text="guarded")
            await guard.get_by_role("button", name="Resume and release").click()
            await expect(operator.locator("tr.guard", has_text="guarded")).to_have_count(0)

            # A silence, added with its comment.
            await operator.goto(console.url + "/ui/silences")
            await operator.get_by_label("Matches").fill(f"iccid={sim['iccid']}")
            await operator.get_by_label("Comment").fill("antenna work")
            await operator.get_by_role("button", name="Add silence").click()
            await expect(operator.locator("tr.silence")).to_contain_text("antenna work")
            await operator.screenshot(path=shots / "silences.png", full_page=True)

            # The SIM view, on a phone-sized screen, found by its endpoint's name.
            await operator.set_viewport_size({"width": 390, "height": 800})
            endpoint = next(e for e in simulator.state.endpoints() if e["sim"]["id"] == sim["id"])
            await operator.goto(console.url + "/ui/sim")
            await operator.get_by_label("ICCID, endpoint id or name").fill(endpoint["name"])
            await operator.get_by_role("button", name="Search").click()
            await expect(operator.locator("h1")).to_contain_text(sim["iccid"])
            await expect(operator.locator(".verdicts").first).to_contain_text("quota")
            await operator.screenshot(path=shots / "sim-phone.png", full_page=True)
        finally:
            await browser.close()


async def _log_in(page, url: str, login: str) -> None:
    await page.goto(url + "/ui")
    await page.get_by_label("Password or token").fill(login)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url("**/ui/overview")
