"""Checks of the book itself (not of ntklib): setup cells, chapter pairing, executed baselines, rendered math.

The Chromium test needs a built book (``_build/html``). It is skipped only when that folder does not
exist *and* ``NTK_BOOK_REQUIRE_BUILD`` is unset; the README's test command builds the book and sets the
variable, so in CI it always runs.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import jupytext
import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
BUILD_HTML = ROOT / "_build" / "html"
CHAPTER_GLOB = "[0-9][0-9]_*"
URL_RE = re.compile(r"https?://[^\s\"'<>)]+")
# Folders never searched for copies of the repository URL (environments, build outputs, caches).
SKIP_DIRS = {".git", ".venv", "_build", "_mathjax", ".jupyter_cache", ".pytest_cache", ".ruff_cache",
             ".hypothesis", "__pycache__", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".bib",
                 ".json", ".rst", ".in", ""}


def load_yaml(name: str):
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def repository_url() -> str:
    url = load_yaml("_config.yml")["repository"]["url"]
    assert isinstance(url, str) and url.startswith("https://"), url
    return url


def toc_files() -> list[str]:
    """Every document named in ``_toc.yml`` (root first), without suffix."""
    toc = load_yaml("_toc.yml")
    found = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [str(Path(f).with_suffix("")) for f in found]


def toc_chapters() -> list[str]:
    return [f for f in toc_files() if f.startswith("chapters/")]


def first_cell(nb) -> dict:
    assert nb["cells"], "empty notebook"
    return nb["cells"][0]


def cell_source(cell) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def read_ipynb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# (a) the hidden setup cell installs ntklib from the repository named in _config.yml


def test_config_repository_and_launch_buttons():
    config = load_yaml("_config.yml")
    assert config["repository"]["branch"] == "main"
    assert str(config["repository"]["path_to_book"]) == "."
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["execute"]["allow_errors"] is False
    assert "chapters/*.ipynb" in config["exclude_patterns"]


@pytest.mark.parametrize("chapter", toc_chapters())
def test_setup_cell_installs_from_config_url(chapter):
    url = repository_url()
    md_nb = jupytext.read(ROOT / f"{chapter}.md")
    ipynb = read_ipynb(ROOT / f"{chapter}.ipynb")
    for where, cell in ((".md", first_cell(md_nb)), (".ipynb", first_cell(ipynb))):
        source = cell_source(cell)
        assert cell["cell_type"] == "code", f"{chapter}{where}: the first cell must be the setup code cell"
        tags = cell.get("metadata", {}).get("tags", [])
        assert "remove-cell" in tags, f"{chapter}{where}: the setup cell must be hidden (tag remove-cell)"
        assert "import ntklib" in source and "except ImportError" in source, f"{chapter}{where}: {source!r}"
        assert URL_RE.findall(source) == [url], f"{chapter}{where}: setup cell must use exactly {url}"
        assert f'pip install --quiet "git+{url}"' in source, f"{chapter}{where}: {source!r}"
        assert "--no-deps" not in source and "jax" not in source.replace("ntklib", ""), source


def test_setup_cells_identical_across_chapters():
    chapters = toc_chapters()
    sources = {c: cell_source(first_cell(read_ipynb(ROOT / f"{c}.ipynb"))) for c in chapters}
    assert len(set(sources.values())) == 1, sources


def test_repository_url_written_only_in_config_and_setup_cells():
    """The URL lives in _config.yml; chapters carry it once, in the setup cell (Colab has no _config.yml)."""
    url = repository_url()
    stray = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".venv")
                       and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(ROOT).as_posix()
            if path.suffix not in TEXT_SUFFIXES or rel == "_config.yml":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            count = text.count(url.removeprefix("https://"))
            chapter_file = path.parent == CHAPTERS and re.fullmatch(r"\d\d_.*\.(md|ipynb)", name)
            if count and not (chapter_file and count == 1):
                stray.append(f"{rel} ({count}x)")
    assert not stray, f"the repository URL must be written only in _config.yml (and once per setup cell): {stray}"


# ----------------------------------------------------------------------------------------------------------
# (b) every chapter of the TOC is a paired, executed notebook


def test_toc_lists_every_chapter():
    on_disk = sorted(f"chapters/{p.stem}" for p in CHAPTERS.glob(CHAPTER_GLOB + ".md"))
    assert toc_chapters(), "no chapters in _toc.yml"
    assert sorted(toc_chapters()) == on_disk, "every chapters/NN_*.md must be in _toc.yml and vice versa"
    for doc in toc_files():
        assert (ROOT / f"{doc}.md").is_file(), f"{doc}.md named in _toc.yml does not exist"


@pytest.mark.parametrize("chapter", toc_chapters())
def test_chapter_is_paired_and_executed(chapter):
    md, ipynb = ROOT / f"{chapter}.md", ROOT / f"{chapter}.ipynb"
    assert md.is_file() and ipynb.is_file(), f"{chapter}: needs both .md and .ipynb"
    md_nb = jupytext.read(md)
    assert md_nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{chapter}.md: kernel must be python3"
    nb = read_ipynb(ipynb)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 2, f"{chapter}: a chapter needs the setup cell and at least one check"
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"{chapter}.ipynb: code cells {unexecuted} not executed; run scripts/execute_notebooks.py"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), \
        f"{chapter}.ipynb: not executed top to bottom in one fresh kernel"
    assert any(c.get("outputs") for c in code), f"{chapter}.ipynb has no outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{chapter}.ipynb stores an error output"
    timing = [c["metadata"]["execution"] for c in code if "execution" in c.get("metadata", {})]
    assert not timing, f"{chapter}.ipynb has timing metadata; regenerate with scripts/execute_notebooks.py"


# ----------------------------------------------------------------------------------------------------------
# (c) equations are typeset offline in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--mute-audio", "--virtual-time-budget=15000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium not found: install Debian's `chromium` (./run_tests.sh does so when missing)")


def dump_dom(page: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                                 page.as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def built_book() -> Path:
    if not BUILD_HTML.is_dir():
        if not os.environ.get("NTK_BOOK_REQUIRE_BUILD"):
            pytest.skip("no _build/html (build the book first, or set NTK_BOOK_REQUIRE_BUILD=1 to require it)")
        pytest.fail("NTK_BOOK_REQUIRE_BUILD is set but _build/html does not exist")
    return BUILD_HTML


@pytest.mark.parametrize("chapter", toc_chapters())
def test_math_typeset_in_chromium(built_book, chapter):
    page = built_book / f"{chapter}.html"
    assert page.is_file(), f"{page} was not built"
    static = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    scripts = [s.get("src", "") for s in static.find_all("script")]
    mathjax = [s for s in scripts if "tex-chtml" in s or "mathjax" in s.lower()]
    assert mathjax and not any("://" in s for s in mathjax), f"MathJax must be served locally: {mathjax}"
    assert (page.parent / mathjax[0].split("?")[0]).resolve().is_file(), f"{mathjax[0]} is missing from the build"
    n_math = len(static.select(".math"))
    assert n_math > 0, f"{chapter}: no math on the page"

    dom = BeautifulSoup(dump_dom(page), "html.parser")
    containers = dom.find_all("mjx-container")
    assert len(containers) >= n_math, f"{chapter}: {len(containers)} mjx-container for {n_math} math elements"
    untypeset = [m for m in dom.select(".math") if not m.find("mjx-container")]
    assert not untypeset, f"{chapter}: math left untypeset: {[m.get_text()[:60] for m in untypeset[:5]]}"
    # A TeX error still yields an mjx-container, holding an <mjx-merror data-mjx-error="..."> box.
    errors = [e["data-mjx-error"] for e in dom.find_all(attrs={"data-mjx-error": True})]
    assert not errors, f"{chapter}: MathJax could not typeset {len(errors)} formula(s): {errors[:5]}"
    for tag in dom.find_all(["script", "style", "noscript", "mjx-container", "template"]):
        tag.decompose()
    text = dom.get_text(" ")
    for raw in ("$$", "\\[", "\\]", "\\(", "\\begin{"):
        assert raw not in text, f"{chapter}: raw TeX {raw!r} left in the visible text"



@pytest.mark.parametrize("chapter", toc_chapters())
def test_colab_button_opens_the_chapter_notebook(built_book, chapter):
    config = load_yaml("_config.yml")
    repo = urlsplit(repository_url()).path.strip("/")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    html = BeautifulSoup((built_book / f"{chapter}.html").read_text(encoding="utf-8"), "html.parser")
    links = [a["href"] for a in html.find_all("a", href=True) if a["href"].startswith(colab)]
    assert links, f"{chapter}: no Colab launch button"
    parts = urlsplit(links[0])
    # a browser drops "/./" segments (path_to_book is ".")
    path = posixpath.normpath(parts.path)
    branch = config["repository"]["branch"]
    assert f"{parts.scheme}://{parts.netloc}{path}" == f"{colab}/github/{repo}/blob/{branch}/{chapter}.ipynb"

# ----------------------------------------------------------------------------------------------------------
# the stages run_tests.sh ran before this pytest run (ruff, sync check, book build)


def test_earlier_stages_passed():
    """Turn a failed stage of ./run_tests.sh into a failed test, so pytest's closing summary covers the run."""
    stages_dir = os.environ.get("NTK_BOOK_STAGES")
    if not stages_dir:
        pytest.skip("not run by ./run_tests.sh (NTK_BOOK_STAGES unset)")
    results = {p.name: p.read_text().split() for p in sorted(Path(stages_dir).iterdir())}
    assert {"ruff", "check_sync", "build"} <= results.keys(), f"missing stage results: {sorted(results)}"
    failed = {name: f"exit status {rc}" for name, (rc, _seconds) in results.items() if rc != "0"}
    assert not failed, f"stages of ./run_tests.sh failed (see their output above): {failed}"
