"""The web page in a real headless browser (Debian's chromium driven by Playwright).

The server is the real app under uvicorn on 127.0.0.1 (a free port), over the tiny run and
index of tests/test_serving.py. The test browses, clicks an item and checks that its
neighbours appear with Hamming distances, searches with a photo (file picker and
drag-and-drop), filters, checks the page stays on this host and fits a phone screen, and
saves screenshots into its tmp folder. A second test walks the page's history: an opened
item's URL (``?item=ID``), back and forward, a GIF photo search, and links opened directly.

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


def _kind_is(page, text: str) -> None:
    page.wait_for_function("(t) => !document.querySelector('#panel').hidden"
                           " && document.querySelector('#q-kind').textContent === t", arg=text)


def _item_in_url(page) -> str | None:
    return page.evaluate("new URLSearchParams(location.search).get('item')")


def test_page_urls_and_back_button(server, browser, tiny_index, tmp_path):  # noqa: F811
    from PIL import Image

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("#grid .card img")
    assert _item_in_url(page) is None and page.locator("#panel").is_hidden()

    # an opened item has its own URL, and the page title names it
    card = page.locator("#grid .card").nth(2)
    item_id, name = card.get_attribute("data-id"), card.get_attribute("title")
    card.click()
    _kind_is(page, f"Item {item_id}")
    assert _item_in_url(page) == item_id and page.title().startswith(name)
    card.click()  # the open item again: no second history entry
    nb_id = page.locator("#results .card").first.get_attribute("data-id")
    page.locator("#results .card").first.click()
    _kind_is(page, f"Item {nb_id}")
    assert _item_in_url(page) == nb_id

    # back and forward walk through the opened items, then the bare catalogue
    page.go_back()
    _kind_is(page, f"Item {item_id}")
    assert _item_in_url(page) == item_id
    page.go_back()
    page.wait_for_selector("#panel", state="hidden")
    assert _item_in_url(page) is None and page.url.rstrip("/") == server
    page.go_forward()
    _kind_is(page, f"Item {item_id}")

    # a photo search (an animated GIF) gets a history entry on the URL without ?item
    frames = [Image.open(m["image_path"]).convert("RGB").resize((60, 80)) for m in _photos(tiny_index, 2)]
    gif = tmp_path / "moving.gif"
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    page.set_input_files("#file", str(gif))
    page.wait_for_function("document.querySelector('#q-title').textContent === 'moving.gif'")
    page.wait_for_selector("#results .card .dist")
    assert page.text_content("#q-kind") == "Your photo" and _item_in_url(page) is None
    page.go_back()
    _kind_is(page, f"Item {item_id}")
    page.go_forward()
    page.wait_for_function("document.querySelector('#q-title').textContent === 'moving.gif'")
    assert _item_in_url(page) is None

    # closing the panel is a step back can undo
    page.go_back()
    _kind_is(page, f"Item {item_id}")
    page.click("#close")
    assert page.locator("#panel").is_hidden() and _item_in_url(page) is None
    page.go_back()
    _kind_is(page, f"Item {item_id}")

    # the URL alone opens the item: a shared link or a bookmark, in a new tab
    other = browser.new_page(viewport={"width": 1360, "height": 900})
    other.set_default_timeout(TIMEOUT_MS)
    # (an item of the grid's first page, so that its card there is marked too)
    other.goto(f"{server}/?item={item_id}")
    _kind_is(other, f"Item {item_id}")
    other.wait_for_selector("#results .card .dist")
    other.wait_for_selector(f"#grid .card.selected[data-id='{item_id}']")
    other.screenshot(path=str(tmp_path / "shared-link.png"))

    # a photo is not kept across a reload: its entry then shows the catalogue, never another photo
    still = tmp_path / "still.png"
    frames[1].save(still)
    other.set_input_files("#file", str(gif))
    other.wait_for_function("document.querySelector('#q-title').textContent === 'moving.gif'")
    other.reload()
    other.wait_for_selector("#grid .card")
    assert other.locator("#panel").is_hidden() and _item_in_url(other) is None
    other.set_input_files("#file", str(still))
    other.wait_for_function("document.querySelector('#q-title').textContent === 'still.png'")
    other.go_back()
    other.wait_for_selector("#panel", state="hidden")
    other.go_back()
    _kind_is(other, f"Item {item_id}")

    # a link to an item that is not there: a message, the catalogue, no panel
    for bad, message in (("999999", "no item with id 999999"), ("shoes", "not an item id")):
        other.goto(f"{server}/?item={bad}")
        other.wait_for_selector("#toast:not([hidden])")
        assert message in other.inner_text("#toast")
        assert other.locator("#panel").is_hidden()
        other.wait_for_selector("#grid .card")
    assert not errors, errors


def test_screenshot_script(tiny_run, tiny_index, tmp_path, capsys):  # noqa: F811
    """benchmarks/screenshot_page.py, which takes the README's picture, on the tiny run."""
    import importlib.util

    from PIL import Image

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "screenshot_page.py"
    spec = importlib.util.spec_from_file_location("screenshot_page", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    item = _photos(tiny_index, 5)[4]["id"]
    out = tmp_path / "docs" / "page.png"
    assert module.main([str(tiny_run), str(tiny_index), str(out), "--item", str(item),
                        "--width", "1200", "--height", "700", "--chromium", CHROMIUM]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size == (1200, 700)
        # photos, not a blank or half-drawn page (the script waits for the neighbours itself)
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 1000
    with pytest.raises(SystemExit):  # a missing folder is a usage error, not a traceback
        module.main([str(tmp_path / "nope"), str(tiny_index), str(out)])


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
