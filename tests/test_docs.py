"""The documentation builds without a warning, and every internal link of the site and the README resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


class _LinksAndIds(HTMLParser):
    """Collects the ``id``s of one HTML page and the URLs its ``href`` / ``src`` attributes point to."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:  # noqa: ARG002
        for name, value in attrs:
            if value is None:
                continue
            if name in {"id", "name"}:
                self.ids.add(value)
            elif name in {"href", "src"}:
                self.urls.append(value)


def _parse(page: Path) -> _LinksAndIds:
    parser = _LinksAndIds()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _is_external(url: str) -> bool:
    # A scheme (http:, mailto:, data:, ...) or a network location: not a file of the site.
    parts = urlsplit(url)
    return bool(parts.scheme or parts.netloc)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``mkdocs build --strict`` writes it (strict: any warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    return out


def test_site_has_every_guide_page_and_the_api_reference(site: Path) -> None:
    for page in ("index.html", "quickstart/index.html", "models/index.html", "deployment/index.html",
                 "api/models/index.html", "experiments/index.html", "experiments/detection/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "models" / "index.html").read_text(encoding="utf-8")
    # Generated from the docstrings, not written by hand: the constructor's arguments are documented.
    assert 'id="simpleslicenet.models.simpleslicenet.SimpleSliceNet"' in api
    assert "depth_stride" in api


def test_every_internal_link_of_the_site_resolves(site: Path) -> None:
    pages = {page: _parse(page) for page in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for url in parsed.urls:
            if _is_external(url):
                continue
            parts = urlsplit(url)
            path = unquote(parts.path)
            # The 404 page links from the site's root, since it is served at any depth.
            base = site if path.startswith("/") else page.parent
            target = (base / path.lstrip("/")).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {url} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {url} (no such anchor)")
    assert not broken, "\n".join(broken)


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _markdown_anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6}\s+(.*)", line)):
            anchors.add(_github_anchor(match.group(1)))
    return anchors


def _markdown_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # commands in code blocks are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


MODEL_READMES = sorted((ROOT / "src" / "simpleslicenet" / "models").glob("*/README.md"))


@pytest.mark.parametrize("readme", [README, *MODEL_READMES], ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_of_the_readmes_resolves(readme: Path) -> None:
    links = _markdown_links(readme.read_text(encoding="utf-8"))
    assert len(links) >= (10 if readme == README else 1)  # pictures, the guide, the results
    broken = []
    for url in links:
        if _is_external(url):
            continue
        parts = urlsplit(url)
        target = (readme.parent / unquote(parts.path)) if parts.path else readme
        if not target.exists():
            broken.append(f"{url} (no such file)")
        elif parts.fragment and target.suffix == ".md" and parts.fragment not in _markdown_anchors(target):
            broken.append(f"{url} (no such heading)")
    assert not broken, "\n".join(broken)


def test_link_checks_notice_a_broken_link(tmp_path: Path) -> None:
    # The checks above must be able to fail: a missing file and a missing heading are both reported.
    (tmp_path / "page.md").write_text("# A heading\n", encoding="utf-8")
    links = _markdown_links("[ok](page.md#a-heading) [gone](missing.md) ```\n[code](x.md)\n```")
    assert links == ["page.md#a-heading", "missing.md"]
    assert "a-heading" in _markdown_anchors(tmp_path / "page.md")
    assert not (tmp_path / links[1]).exists()
    assert _github_anchor("Deployment: export, calibrate, predict") == "deployment-export-calibrate-predict"
