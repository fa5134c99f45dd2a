"""The live page in a real browser (Debian chromium via Playwright) against the demo models, and
its task picker against two tasks' scripted models.

Never ``playwright install``: the browser is the system's ``/usr/bin/chromium`` (``scripts/test.sh`` installs it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import anyio
import pytest
from PIL import Image
from ws_support import make_reasoner, serving

from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import get_task

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# where the page's screenshot goes: the test's own folder, unless DREAMR_SCREENSHOT names the
# committed picture to refresh (benchmarks/results/ws_page.png), so a test run leaves the tree clean
SCREENSHOT_ENV = "DREAMR_SCREENSHOT"

# Records, at every DOM change, how many steps are verified and whether the answer is shown, and
# the states each step index went through (pending, done): each WebSocket message is its own
# task, so each step's arrival is its own observation.
OBSERVE = """
window.__log = [];
window.__states = {};
new MutationObserver(() => {
  const steps = document.querySelectorAll('#steps .step.verified, #steps .step.fallback').length;
  const answer = document.getElementById('answer');
  const entry = [steps, !!answer && getComputedStyle(answer).display !== 'none'];  // what the user sees
  const last = window.__log[window.__log.length - 1];
  if (!last || last[0] !== entry[0] || last[1] !== entry[1]) window.__log.push(entry);
  for (const li of document.querySelectorAll('#steps .step[data-index]')) {
    if (li.classList.contains('rejected')) continue;  // a turned-down draft; its step goes on pending
    const seen = (window.__states[li.dataset.index] ||= []);
    if (seen[seen.length - 1] !== li.dataset.state) seen.push(li.dataset.state);
  }
}).observe(document, {subtree: true, childList: true, attributes: true});
"""
BADGES = {"draft", "rejected", "target", "repaired", "cache"}


@pytest.fixture(scope="module")
def demo_reasoner() -> Reasoner:
    return Reasoner.demo()


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: apt-get install -y chromium (or run scripts/test.sh)", pytrace=False)
    return CHROMIUM


async def test_page_streams_verified_steps_then_the_answer(
    demo_reasoner: Reasoner, chromium: str, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ws_page.png")
    async with serving(demo_reasoner) as server, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            await page.add_init_script(OBSERVE)
            await page.goto(server.http_url)
            await expect(page.locator("#conn")).to_have_attribute("data-state", "up")

            # picking a file works (preview shown); then take a generated demo puzzle instead
            picked = tmp_path / "picked.png"
            Image.new("RGB", (64, 64), (30, 120, 200)).save(picked)
            await page.locator("#file").set_input_files(picked)
            await expect(page.locator("#preview")).to_be_visible()
            await page.get_by_role("button", name="New demo puzzle").click()
            await expect(page.locator("#expected")).to_be_visible()
            question = await page.get_by_label("Question").input_value()
            image_url = await page.locator("#preview").get_attribute("src")
            assert question and image_url and image_url.startswith("data:image/png;base64,")

            await page.get_by_label("Question").press("Enter")  # keyboard submit
            await expect(page.locator("#answer")).to_be_visible(timeout=120_000)
            await expect(page.locator("#stats")).to_be_visible()
            await expect(page.locator("#status")).to_contain_text("Done")
            # the answer collapses the reasoning to one line; one click on it shows the steps again
            thoughts = page.locator("#thoughts")
            await expect(page.locator("#thoughts-summary")).to_have_text(
                re.compile(r"^Thought for \d+(\.\d)? s · \d+ steps")
            )
            assert not await thoughts.evaluate("d => d.open")
            await expect(page.locator("#steps")).to_be_hidden()
            await page.locator("#thoughts-summary").click()
            await expect(page.locator("#steps")).to_be_visible()
            badges = await page.locator("#steps .step .badge").evaluate_all(
                "els => els.map(b => [...b.classList].filter(c => c !== 'badge')[0])"
            )
            legend = set(await page.locator(".legend .badge").evaluate_all("els => els.map(b => b.classList[1])"))
            states = await page.evaluate("window.__states")
            summary = await page.locator("#thoughts-summary").inner_text()
            shown_answer = (await page.locator("#answer-text").text_content() or "").strip()
            shown_steps = await page.locator(
                "#steps .step.verified .text, #steps .step.fallback .text"
            ).all_inner_texts()
            log = await page.evaluate("window.__log")
            announced = await page.locator("#announce").inner_text()
            await page.screenshot(path=str(screenshot), full_page=True)
        finally:
            await browser.close()

    # verified steps appeared one by one, every one of them before the answer
    counts_before_answer = [n for n, answer_shown in log if not answer_shown and n > 0]
    assert counts_before_answer == list(range(1, len(shown_steps) + 1)), log
    assert len(shown_steps) >= 2 and "Answer" in announced
    # each step was pending (thinking or drafting) before it was done, and none is left pending
    assert {int(i) for i in states} == set(range(len(shown_steps))), states
    assert all(seen[0] == "pending" and seen[-1] == "done" for seen in states.values()), states
    # every step kept its badge, from the legend's set; the summary counts the steps shown
    assert set(badges) <= BADGES and len(badges) >= len(shown_steps) and legend >= BADGES, badges
    assert f"{len(shown_steps)} steps" in summary
    # the page's answer is the library's answer on the same image and question
    expected = await demo_reasoner.ainvoke(base64.b64decode(image_url.split(",", 1)[1]), question)
    assert shown_answer == (expected.answer or "(no answer)")
    assert [s.strip() for s in shown_steps] == [s.text.strip() for s in expected.steps]
    assert not problems, problems
    assert Image.open(io.BytesIO(await anyio.Path(screenshot).read_bytes())).width >= 1000


async def test_the_task_picker_switches_the_puzzle_and_sends_the_task(chromium: str) -> None:
    """Two tasks served: the picker (a labelled select, used from the keyboard) takes the picked
    task's demo puzzle, says what it shows from the task's title, and the request names the task.
    Each task's models are scripted to a different answer, so the answer says which answered."""
    from playwright.async_api import async_playwright, expect

    chart_steps = ["Bar C: 58", "Answer: 58"]
    tasks = {"grid": make_reasoner(), "charts": make_reasoner(target=chart_steps, draft=chart_steps)}
    charts_title = get_task("charts").title
    async with serving(tasks) as server, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            sent: list[str] = []
            page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
            await page.goto(server.http_url)
            await expect(page.locator("#conn")).to_have_attribute("data-state", "up")

            picker = page.get_by_label("Task", exact=True)
            await expect(picker).to_be_visible()
            await expect(picker).to_have_value("grid")  # the default task first
            await page.get_by_role("button", name="New demo puzzle").click()
            await expect(page.locator("#expected")).to_contain_text("Demo grid puzzle")
            grid_image = await page.locator("#preview").get_attribute("src")

            await picker.focus()
            await page.keyboard.press("ArrowDown")  # the keyboard picks the next task
            await expect(picker).to_have_value("charts")
            # the grid's puzzle is no question for the chart models: the picker takes a chart's
            await expect(page.locator("#expected")).to_contain_text(f"Demo charts puzzle ({charts_title})")
            preview = page.locator("#preview")
            await expect(preview).to_have_attribute("alt", f"demo puzzle of the charts task: {charts_title}")
            chart_image = await preview.get_attribute("src")
            assert chart_image and chart_image != grid_image
            shown = Image.open(io.BytesIO(base64.b64decode(chart_image.split(",", 1)[1])))
            assert shown.size == (224, 224)  # a chart, not a 112 px grid

            await page.get_by_label("Question").press("Enter")
            await expect(page.locator("#answer-text")).to_have_text("58", timeout=30_000)
        finally:
            await browser.close()

    asks = [m for m in (json.loads(f) for f in sent) if m.get("type") == "ask"]
    assert [m["task"] for m in asks] == ["charts"], asks
    assert not problems, problems
