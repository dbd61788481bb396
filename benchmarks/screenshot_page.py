"""A picture of the search page for the README: serve a run's index on a free loopback port,
open the page in headless chromium (Debian's, driven by Playwright; nothing is downloaded),
open one item so its nearest neighbours show, and save the window as a PNG.

    python benchmarks/screenshot_page.py runs/demo runs/demo/index docs/page.png
    python benchmarks/screenshot_page.py runs/demo runs/demo/index docs/page.png --item 15970

Without ``--item`` the page opens the catalogue's first item. Needs the ``serve`` extra,
``pip install playwright`` (the Python package only) and ``apt-get install -y chromium``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
# every photo in view decoded: a screenshot with half-loaded thumbnails is no picture
IMAGES_LOADED = ("[...document.querySelectorAll('#results .card img, #grid .card img')]"
                 ".filter(i => i.getBoundingClientRect().top < window.innerHeight)"
                 ".every(i => i.complete)")


def default_chromium() -> str:
    return os.environ.get("FASHIONHASH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.contextmanager
def serving(run_dir: Path, index_dir: Path) -> Iterator[str]:
    """The app over ``index_dir`` under uvicorn in a thread; yields its base URL. The
    socket is bound before the server starts, so no other process can take the port."""
    import uvicorn

    from fashionhash.serving import SearchService, ServiceConfig, create_app

    service = SearchService.open(run_dir, index_dir, ServiceConfig())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the search service did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        service.close()


def screenshot(url: str, out: Path, item: int | None, width: int, height: int, chromium: str) -> Path:
    """Open ``item`` (or the first card) on the page at ``url`` and save the window to ``out``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            if item is None:
                page.goto(url + "/")
                page.wait_for_selector("#grid .card")
                page.locator("#grid .card").first.click()
            else:
                page.goto(f"{url}/?item={item}")
            page.wait_for_selector("#results .card .dist")
            page.wait_for_function(IMAGES_LOADED)
            page.mouse.move(0, 0)  # no hover highlight in the picture
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="trained run (e.g. runs/demo)")
    p.add_argument("index_dir", type=Path, help="its index (e.g. runs/demo/index)")
    p.add_argument("out", type=Path, help="PNG to write (e.g. docs/page.png)")
    p.add_argument("--item", type=int, help="item to open (default: the catalogue's first)")
    p.add_argument("--width", type=int, default=1360)
    p.add_argument("--height", type=int, default=860)
    p.add_argument("--chromium", default=default_chromium(), help="chromium executable (default: %(default)s)")
    args = p.parse_args(argv)
    for path in (args.run_dir, args.index_dir):
        if not path.is_dir():
            p.error(f"{path} is not a folder")
    if not Path(args.chromium).is_file():
        p.error(f"no chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium")
    with serving(args.run_dir, args.index_dir) as url:
        out = screenshot(url, args.out, args.item, args.width, args.height, args.chromium)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
