"""End to end: the real Streamlit server driven by headless Chromium (Playwright).

Starts the app (``python -m cinf_core app``'s server command) on a free loopback port with CINF_WORKSPACE pointing at the small
prebuilt workspace, opens every page in real time (never with a virtual-time budget, which
captures an empty shell), waits for its content, checks that no exception or error is shown and
saves a screenshot per page under ``test-output/screenshots/`` (git-ignored).
"""
import os
import socket
import subprocess
from pathlib import Path

import pytest

from cinf_core.cli import streamlit_command

from conftest import wait_until_serving
from workspace_fixture import build_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "screenshots"
# (url path, title on the page, plotly charts expected on first load)
# A deep link comes first on purpose: a fresh server must show the frame (sidebar picker) there.
PAGES = [
    ("influential_examples", "Influential examples", 0),
    ("concepts", "Concepts", 2),
    ("sae_features", "SAE features", 3),
    ("method_agreement", "Method agreement", 3),
    ("filter_retrain", "Filter & retrain", 2),
    ("runs_cost", "Runs & cost", 2),
    ("", "Concept Influence explorer", 1),
]
ERROR_SELECTORS = ['[data-testid="stException"]', '[data-testid="stAlertContentError"]']

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    workspace = build_workspace(tmp_path_factory.mktemp("e2e_ws"), model_dir=tiny_model_dir)
    port = _free_port()
    env = dict(os.environ, CINF_WORKSPACE=str(workspace), PYTHONPATH=str(ROOT))
    log = open(tmp_path_factory.mktemp("e2e_log") / "streamlit.log", "wb")
    proc = subprocess.Popen(
        streamlit_command("127.0.0.1", port) + ["--server.fileWatcherType", "none"],
        cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, base, log.name, stop=proc.kill)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking"])
        yield b
        b.close()


def _settle(page, title: str, charts: int) -> None:
    """Wait until the page's title shows, the script stopped running and the charts drew."""
    page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    if charts:
        page.wait_for_function(
            f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}",
            timeout=60_000)
    page.wait_for_timeout(800)  # let fonts, dataframes (canvas) and plotly transitions finish


def _no_errors(page) -> None:
    for sel in ERROR_SELECTORS:
        found = page.locator(sel)
        assert found.count() == 0, f"{sel}: {found.first.inner_text()[:500]}"


def _shot(page, name: str) -> Path:
    """Screenshot the whole page: Streamlit scrolls inside its own container, so grow the
    viewport to the content's height first (capped) and let the charts re-layout."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        "() => Math.max(document.body.scrollHeight, ...Array.from(document.querySelectorAll("
        "'[data-testid=\"stMain\"], [data-testid=\"stAppViewContainer\"]'), e => e.scrollHeight))")
    width = page.viewport_size["width"]
    page.set_viewport_size({"width": width, "height": min(int(height) + 40, 6000)})
    page.wait_for_timeout(1000)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 1000})
    return path


@pytest.mark.parametrize("url_path,title,charts", PAGES, ids=[p[0] or "overview" for p in PAGES])
def test_page_in_chromium(server, browser, url_path, title, charts):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    try:
        page.goto(f"{server}/{url_path}", wait_until="domcontentloaded")
        _settle(page, title, charts)
        _no_errors(page)
        assert page.get_by_text("Workspace folder").count() == 1, "the app.py frame is missing"
        assert _shot(page, url_path or "overview").stat().st_size > 10_000
    finally:
        page.close()


def test_influential_examples_interactions(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    try:
        page.goto(f"{server}/influential_examples", wait_until="domcontentloaded")
        _settle(page, "Influential examples", 0)
        page.get_by_text("Highlight response tokens").click()
        page.locator("span[title^='+'], span[title^='-']").first.wait_for(timeout=90_000)
        _settle(page, "Influential examples", 0)
        _no_errors(page)
        _shot(page, "influential_examples-highlight")

        for tab, charts, name in (("Score distribution", 1, "distribution"),
                                  ("Compare methods", 1, "compare")):
            page.get_by_role("tab", name=tab).click()
            _settle(page, "Influential examples", charts)
            _no_errors(page)
            _shot(page, f"influential_examples-{name}")

        page.get_by_role("tab", name="Export").click()
        _settle(page, "Influential examples", 0)
        with page.expect_download(timeout=60_000) as info:
            page.get_by_role("button", name="Download filtered dataset (.jsonl)").click()
        target = tmp_path / "filtered.jsonl"
        info.value.save_as(str(target))
        lines = target.read_text().splitlines()
        assert len(lines) == 54  # 60 examples, top 10% removed
        _no_errors(page)
    finally:
        page.close()


def test_switching_pages_keeps_the_session(server, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    try:
        page.goto(f"{server}/", wait_until="domcontentloaded")
        _settle(page, "Concept Influence explorer", 1)
        page.get_by_role("link", name="Method agreement").click()
        _settle(page, "Method agreement", 3)
        page.get_by_role("link", name="Filter & retrain").click()
        _settle(page, "Filter & retrain", 2)
        _no_errors(page)
    finally:
        page.close()



def test_background_job_progress_in_the_browser(server, browser):
    """Start a scoring job from Runs & cost; the live panel follows it to its result."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    try:
        page.goto(f"{server}/runs_cost", wait_until="domcontentloaded")
        _settle(page, "Runs & cost", 2)
        page.get_by_role("button", name="Prepare scoring run").click()
        start = page.get_by_role("button", name="Start scoring: Vector Filter · evil")
        start.wait_for(timeout=30_000)
        start.click()
        page.locator('[data-testid="stProgress"]').first.wait_for(timeout=30_000)
        _shot(page, "runs_cost-job-running")
        done = page.get_by_text("Score the training set: done.")
        failed = page.get_by_text("Score the training set failed")
        page.wait_for_function(
            "() => /Score the training set(: done| failed)/.test(document.body.innerText)",
            timeout=240_000)
        _settle(page, "Runs & cost", 2)
        _no_errors(page)
        _shot(page, "runs_cost-job-done")
        assert done.count() == 1, failed.first.inner_text() if failed.count() else "no outcome"
    finally:
        page.close()
