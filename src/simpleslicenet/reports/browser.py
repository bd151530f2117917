"""Report pages in a real browser: headless Chromium driven by selenium, for the tests and for screenshots.

Uses Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``) and the
``selenium`` package (in the ``test`` extra); nothing is downloaded. :func:`open_page` loads a page and
says what a reader would meet: console errors, pictures that do not decode, how long the page took.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PageLoad", "browser_missing", "headless_chromium", "open_page"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _found(path: str) -> str | None:
    return path if Path(path).exists() else shutil.which(Path(path).name)


def browser_missing() -> str | None:
    """Why a headless Chromium cannot be started here, or ``None`` when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if _found(path) is None:
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def headless_chromium(width: int = 1200, height: int = 900) -> Any:  # noqa: ANN401 - a selenium WebDriver
    """A headless Chromium whose console log can be read (``driver.get_log("browser")``); quit it when done.

    Raises:
        RuntimeError: Chromium, its driver or selenium is missing (:func:`browser_missing` says which).
    """
    reason = browser_missing()
    if reason:
        raise RuntimeError(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _found(CHROMIUM)
    # No sandbox: CI runs as root; no GPU and no /dev/shm use: containers have neither to spare.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_found(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


@dataclass(frozen=True)
class PageLoad:
    """What loading one page gave.

    Args:
        console: The browser console's entries while the page loaded (``level``, ``message``).
        images: ``(alt, decoded)`` for every ``<img>``; decoded means complete with a non-zero size.
        load_ms: Navigation start to the end of the load event, in milliseconds.
        size_bytes: The page file's size.
    """

    console: list[dict]
    images: list[tuple[str, bool]]
    load_ms: float
    size_bytes: int

    @property
    def errors(self) -> list[dict]:
        """Console entries of level SEVERE (script errors, failed loads)."""
        return [entry for entry in self.console if entry.get("level") == "SEVERE"]

    @property
    def undecoded(self) -> list[str]:
        """The ``alt`` text of every picture that did not decode."""
        return [alt for alt, decoded in self.images if not decoded]


def open_page(driver: Any, path: str | Path) -> PageLoad:  # noqa: ANN401
    """Load a page file in ``driver`` and check it as a reader would see it."""
    path = Path(path).resolve()
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.as_uri())
    console = driver.get_log("browser")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0]);"
    )
    load_ms = driver.execute_script(
        "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;"
    )
    return PageLoad(console, [(alt, bool(ok)) for alt, ok in images], float(load_ms), path.stat().st_size)
