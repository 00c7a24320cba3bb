"""Headless Chromium for the web chat page: Debian's `chromium` (scripts/install-system-deps.sh) driven by Playwright
through `executable_path`; Playwright's own browser builds are never downloaded.

Every test gets a fresh profile (`--user-data-dir` under tmp_path) and leaves a screenshot of its last screen in
test-results/web/ (listed at the end of the pytest run).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

# The flags of issue 14; Playwright adds the ones it needs to drive the browser (--remote-debugging-pipe, ...).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS: list[Path] = []


def screenshot_dir(config: pytest.Config) -> Path:
    folder = config.rootpath / "test-results" / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(page: Page, config: pytest.Config, name: str) -> Path:
    """A full-page PNG under test-results/web/, reported in the run's summary."""
    path = screenshot_dir(config) / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.append(path)
    return path


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """`screenshot(page, name)` saves test-results/web/NAME.png."""
    return lambda page, name: save_screenshot(page, request.config, name)


@pytest.fixture
def chromium_page(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A Playwright page in a fresh Chromium profile; a missing browser fails (never skips) with how to install it."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/install-system-deps.sh` (or `make test`)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        page = context.pages[0] if context.pages else context.new_page()
        try:
            yield page
        finally:
            save_screenshot(page, request.config, request.node.name)
            context.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SCREENSHOTS:
        terminalreporter.write_sep("-", "web chat screenshots")
        for path in SCREENSHOTS:
            terminalreporter.write_line(str(path))
