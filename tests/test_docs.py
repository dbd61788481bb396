"""The README and the pages under docs/: every relative link and anchor resolves, the README
stays short and keeps what CI and the report command need, and the generated blocks sit
where their scripts write them."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.M)}


def _links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside fenced code."""
    out, fenced = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out += [(n, t) for t in LINK.findall(line)]
    return out


def test_slug_matches_github():
    assert _slug("Scaling the index out: Milvus") == "scaling-the-index-out-milvus"
    assert _slug("What the paper does, and what this implementation fixes") == \
        "what-the-paper-does-and-what-this-implementation-fixes"


def test_relative_links_and_anchors_resolve():
    assert len(PAGES) >= 6, PAGES  # the README and the docs pages it links
    broken = []
    for page in PAGES:
        for n, target in _links(page):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}:{n}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_keeps_its_commands_and_results():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block  # CI runs the README's make test
    assert text.count("<!-- results:start -->") == 1 and text.count("<!-- results:end -->") == 1
    for page in ("results", "protocol", "method", "api", "scaling"):
        assert f"](docs/{page}.md)" in text, page


def test_the_peer_table_lives_in_the_results_page():
    assert "<!-- table:start -->" not in (REPO / "README.md").read_text()
    results = (REPO / "docs" / "results.md").read_text()
    assert results.count("<!-- table:start -->") == 1 and results.count("<!-- table:end -->") == 1
    block = results.split("<!-- table:start -->")[1].split("<!-- table:end -->")[0]
    # the first line names the invocation that wrote it, and that invocation writes this page
    assert block.startswith("\n`fashionhash table ") and "--readme docs/results.md" in block.split("\n")[1]
    # the README has its one-line-per-method summary, from the same kind of invocation
    readme = (REPO / "README.md").read_text()
    assert readme.count("<!-- headline:start -->") == 1 and readme.count("<!-- headline:end -->") == 1
    head = readme.split("<!-- headline:start -->")[1].split("<!-- headline:end -->")[0]
    assert "`fashionhash table " in head and "--headline README.md" in head and "| CSQ |" in head
    assert "### Product photos" in block and "](../benchmarks/results/pr_kaggle.png)" in block
