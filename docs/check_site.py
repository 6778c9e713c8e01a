"""Open the built docs site in a real browser (headless Chromium) and check that pages render.

    python docs/check_site.py             # mkdocs build --strict, then check site/
    python docs/check_site.py --no-build  # check the site/ already built

The site is served over HTTP from a local port (as ``mkdocs serve`` would, so the search index
loads as it does online). For the home page, a tutorial and a reference page it dumps the DOM
after the page's scripts ran (``chromium --headless --dump-dom``) and checks the title, the
navigation, the search box, a code block and, on the reference page, an API signature rendered
by mkdocstrings; then it saves a screenshot of each under ``site/screenshots/``. It exits 1 and
names what is missing when a check fails. It needs Chromium (Debian: ``apt-get install
chromium``); ``CHROMIUM=/path/to/chrome`` picks another binary.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
SHOTS = SITE / "screenshots"
WINDOW = "1280,1000"

# (page, its <title>, what else it must show: (a name, a regular expression on the rendered DOM))
PAGES = (
    ("index.html", "funcnet", ()),
    ("tutorials/book/index.html", "The book's chapters 3 to 6 - funcnet", ()),
    (
        "reference/layers/index.html",
        "layers - funcnet",
        (
            ("the page's heading", r"<h1[^>]*>Layers \(book: Layer, Dense, NeuralNetwork\)"),
            ("an API signature", r'class="doc-signature[^"]*"[^>]*>.*?Dense'),
            ("Dense's Args table", r"Parameters:.*?neurons"),
        ),
    ),
    # a short module docstring, so the screenshot shows signatures (headless Chromium draws a
    # blank page when told to scroll to an anchor)
    (
        "reference/initializers/index.html",
        "initializers - funcnet",
        (("an API signature", r'class="doc-signature[^"]*"[^>]*>.*?glorot_normal'),),
    ),
)
EVERY_PAGE = (
    ("the navigation", r'<nav class="md-nav[^"]*"'),
    ("the search box", r'<input[^>]*class="md-search__input"'),
    ("a code block", r"<pre[^>]*>(?:(?!</pre>).)*?<code"),
    ("a code block's copy button (the scripts ran)", r'class="md-code__button"'),
)


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


def _run_browser(browser: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    return subprocess.run([browser, *flags, *arguments], capture_output=True, text=True, timeout=120)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A local HTTP server of ``directory`` in a thread; returns it and its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            del format, args

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_page(browser: str, base: str, page: str, title: str, extra: tuple[tuple[str, str], ...]) -> list[str]:
    """What ``page`` lacks (empty when it renders), and its screenshot saved under site/screenshots/."""
    url = base + page
    dom = _run_browser(browser, "--dump-dom", url).stdout
    problems = []
    found_title = re.search(r"<title>(.*?)</title>", dom, re.S)
    shown = html.unescape(found_title.group(1).strip()) if found_title else None
    if shown != title:
        problems.append(f"{page}: title {shown!r}, expected {title!r}")
    for what, pattern in (*EVERY_PAGE, *extra):
        if not re.search(pattern, dom, re.S):
            problems.append(f"{page}: no {what} in the rendered DOM")
    shot = SHOTS / (page.removesuffix("/index.html").replace("/", "-").removesuffix(".html") + ".png")
    _run_browser(browser, f"--screenshot={shot}", f"--window-size={WINDOW}", url)
    if not shot.is_file() or shot.stat().st_size < 10_000:  # a blank page's PNG is about 6 kB
        problems.append(f"{page}: no screenshot (or a blank one) at {shot}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="check the site/ already built")
    args = parser.parse_args(argv)
    browser = chromium()
    if browser is None:
        print("check_site: no chromium found (apt-get install chromium, or set CHROMIUM)", file=sys.stderr)
        return 2
    if not args.no_build:
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q"], cwd=ROOT, check=True, env=env)
    SHOTS.mkdir(parents=True, exist_ok=True)
    server, base = serve(SITE)
    try:
        problems = [p for page, title, extra in PAGES for p in check_page(browser, base, page, title, extra)]
    finally:
        server.shutdown()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"check_site: {len(PAGES)} pages, {len(problems)} problems; screenshots in {SHOTS.relative_to(ROOT)}/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
