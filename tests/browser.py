"""Headless Debian Chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# Every wait of a page (loads, clicks, elements, conditions) may take this long: it bounds a hang only, since a
# loaded 2-core machine runs Chromium, Gradio's front end and the server slowly.
WAIT_MS = 120_000
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Without these flags Chromium keeps calling Google's hosts, which this machine cannot reach.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextmanager
def browser_page() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; ./test.sh installs it with apt-get")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            page.set_default_navigation_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()
