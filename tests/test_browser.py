"""The web page in a real headless browser (Debian's chromium driven by Playwright).

The server is the real app under uvicorn on 127.0.0.1 (a free port), over the tiny run and
index of tests/test_serving.py. The test browses, clicks an item and checks that its
neighbours appear with Hamming distances, searches with a photo (file picker and
drag-and-drop), filters, checks the page stays on this host and fits a phone screen, and
saves screenshots into its tmp folder.

Needs ``pip install playwright`` (the Python package only: it never downloads a browser
here) and ``apt-get install -y chromium``; skipped with the reason when either is missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package only)")

from test_own_catalogue import FAST, manifest  # noqa: E402,F401
from test_serving import _photos, tiny_index, tiny_run  # noqa: E402,F401  (shared, memoised fixtures)

from fashionhash.serving import SearchService, ServiceConfig, create_app  # noqa: E402

CHROMIUM = os.environ.get("FASHIONHASH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium")


@pytest.fixture
def server(tiny_run, tiny_index):  # noqa: F811
    yield from _serve(tiny_run, tiny_index)


def _serve(run: Path, index: Path):
    """The app under uvicorn in a thread, on a socket bound before it starts (no port race)."""
    import uvicorn

    service = SearchService.open(run, index, ServiceConfig())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()
    service.close()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _distances(page) -> list[int]:
    return [int(t.split()[1]) for t in page.locator("#results .card .dist").all_inner_texts()]


def test_page_browse_neighbours_and_photo_search(server, browser, tiny_index, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: foreign.append(r.url)
            if not r.url.startswith((server, "data:", "blob:")) else None)

    page.goto(server + "/")
    page.wait_for_selector("#grid .card img")
    page.wait_for_function("[...document.querySelectorAll('#grid .card img')].slice(0, 8)"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#grid .card").count() == 48
    assert page.inner_text("#count") == "160 items"
    assert "160" in page.inner_text("#stats") and "32-bit codes" in page.inner_text("#stats")
    page.screenshot(path=str(tmp_path / "1-catalogue.png"))

    # click an item: its neighbours appear with their Hamming distances, nearest first
    first = page.locator("#grid .card").nth(1)
    item_id = first.get_attribute("data-id")
    first.click()
    page.wait_for_selector("#results .card .dist")
    assert page.text_content("#q-kind") == f"Item {item_id}"
    dists = _distances(page)
    assert len(dists) == 12 and dists == sorted(dists) and all(0 <= d <= 32 for d in dists)
    assert item_id not in page.locator("#results .card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    assert "ms" in page.inner_text("#q-time")
    page.screenshot(path=str(tmp_path / "2-neighbours.png"))

    # click a neighbour: it becomes the query
    nb = page.locator("#results .card").first
    nb_id = nb.get_attribute("data-id")
    nb.click()
    page.wait_for_function(f"document.querySelector('#q-kind').textContent === 'Item {nb_id}'")

    # pick a photo with the file picker
    photo = _photos(tiny_index, 3)[2]
    page.set_input_files("#file", photo["image_path"])
    page.wait_for_function("document.querySelector('#q-kind').textContent === 'Your photo'")
    page.wait_for_selector("#results .card .dist")
    dists = _distances(page)
    assert dists and dists[0] == 0 and dists == sorted(dists)
    assert "encode" in page.inner_text("#q-time")
    page.screenshot(path=str(tmp_path / "3-photo-search.png"))

    # a filter narrows the grid and re-runs the search within it
    page.select_option("#f-articleType", "Watches")
    page.wait_for_function("document.querySelector('#count').textContent === '40 items'")
    page.wait_for_function("(() => { const subs = [...document.querySelectorAll('#results .card .sub')];"
                           " return subs.length > 0 && subs.every(s => s.textContent.startsWith('Watches')); })()")
    subs = page.locator("#grid .card .sub").all_inner_texts()
    assert len(subs) == 40 and all(s.startswith("Watches") for s in subs)
    page.click("#clear")
    page.wait_for_function("document.querySelector('#count').textContent === '160 items'")

    # drag and drop a photo onto the page
    page.evaluate("""async (url) => {
        const blob = await (await fetch(url)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
        window.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt}));
        window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, cancelable: true}));
    }""", f"{server}/images/{photo['id']}")
    page.wait_for_function("document.querySelector('#q-title').textContent === 'dropped.jpg'")
    page.wait_for_selector("#results .card .dist")
    assert page.locator("#dropzone-overlay").is_hidden()

    # a bad upload shows a message and the page keeps working
    bad = tmp_path / "not-a-photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#toast:not([hidden])")
    assert "Search failed" in page.inner_text("#toast")
    page.click("#next")
    page.wait_for_function("document.querySelector('#page').textContent.startsWith('49')")

    # Escape closes the neighbours panel
    page.keyboard.press("Escape")
    assert page.locator("#panel").is_hidden()
    page.screenshot(path=str(tmp_path / "4-page-2.png"))

    # a phone-sized screen: no sideways scrolling, the panel stacks above the grid
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(server + "/")
    phone.wait_for_selector("#grid .card img")
    phone.locator("#grid .card").first.click()
    phone.wait_for_selector("#results .card .dist")
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    phone.screenshot(path=str(tmp_path / "5-phone.png"))

    assert not foreign, f"the page fetched from other hosts: {foreign}"
    # the one expected console error is the refused upload's 400 response
    assert all("400" in e for e in errors), errors
    for name in ("1-catalogue", "2-neighbours", "3-photo-search", "4-page-2", "5-phone"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_page_filters_by_a_manifests_columns(manifest, browser, tmp_path):  # noqa: F811
    """A catalogue of one's own: its label and colour columns are the page's filters and
    each card's description."""
    from fashionhash.cli import main

    run = tmp_path / "run"
    assert main(["demo", "--data", str(manifest), "--run-dir", str(run), "--quiet", "--no-serve", *FAST]) == 0
    for url in _serve(run, run / "index"):
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.wait_for_selector("#f-colour option[value=red]", state="attached")
        labels = page.locator("#facet-selects label span").all_text_contents()
        assert labels == ["Label", "Colour"]
        page.select_option("#f-colour", "red")
        page.select_option("#f-label", "shoe")
        page.wait_for_function("document.querySelector('#count').textContent === '10 items'")
        assert set(page.locator("#grid .card .sub").all_inner_texts()) == {"shoe · red"}
        assert set(page.locator("#grid .card .title").all_inner_texts()) == {"shoe"}
