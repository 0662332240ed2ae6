"""A screenshot of the leaderboard page in headless Chromium, for the README.

    python -m leaderboard.screenshot results docs/leaderboard.png

takes the results folder of a run (or its index.html). The viewport is set exactly (1280 x 1800 CSS
pixels by default, scale 1), so the picture shows what a reader sees at that width. Needs selenium
(the ``test`` extra) and Debian's chromium and chromium-driver. The browser tests start Chromium
through ``start`` too, with the same flags: no network, no first-run work, a fresh profile."""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def binaries() -> tuple[str | None, str | None]:
    """Chromium and chromedriver as Debian installs them, or None where absent."""
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def start(profile: Path, *, scripts: bool = True, logs: bool = False) -> Any:
    """A headless Chromium driven by chromedriver, with its profile in ``profile`` (a new, empty
    folder); ``scripts=False`` loads pages with JavaScript disabled, as a reader who turned it off."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = binaries()
    if chromium is None or chromedriver is None:
        raise RuntimeError("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if not scripts:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def set_viewport(driver: Any, width: int, height: int) -> None:
    """The page's viewport in CSS pixels, whatever the headless window's frame."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def capture(page: Path, png: Path, width: int = 1280, height: int = 1800) -> Path:
    """Write the top ``height`` pixels of ``page`` at ``width`` to ``png``."""
    with tempfile.TemporaryDirectory(prefix="robustmatrix-chromium-") as profile:
        driver = start(Path(profile))
        try:
            set_viewport(driver, width, height)
            driver.get(page.resolve().as_uri())
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        finally:
            driver.quit()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(base64.b64decode(shot["data"]))
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leaderboard.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the results folder or its page, e.g. results or results/index.html")
    parser.add_argument("png", type=Path, help="where to write the screenshot, e.g. docs/leaderboard.png")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    parser.add_argument("--height", type=int, default=1800, help="viewport height in CSS pixels (default 1800)")
    args = parser.parse_args(argv)
    page = args.page / "index.html" if args.page.is_dir() else args.page
    if not page.is_file():
        parser.error(f"{page} does not exist; run `robustmatrix run` or `robustmatrix leaderboard` first")
    try:
        print(capture(page, args.png, args.width, args.height))
    except RuntimeError as exc:
        print(f"python -m leaderboard.screenshot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
