"""Copy the offline MathJax 3 bundle into ``_mathjax/`` (git-ignored) before a book build.

Only ``es5/tex-chtml-full.js`` and its web fonts (``es5/output/chtml/fonts/woff-v2/``) are copied, from
the pinned PyPI package ``django-static-mathjax``; MathJax's licence goes along. ``_config.yml`` serves
``_mathjax/`` through ``html_extra_path`` (the site gets ``mathjax/es5/...``) and points ``mathjax_path``
at it. Nothing goes under ``_static/``: Jupyter Book would add every ``*.js`` there to every page.

Usage: python scripts/prepare_build.py
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "_mathjax" / "mathjax"
FILES = ("es5/tex-chtml-full.js", "LICENSE")
FONT_DIR = "es5/output/chtml/fonts/woff-v2"


def mathjax_source() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        sys.exit("prepare_build: the 'mathjax' package is missing; install requirements.txt (django-static-mathjax)")
    src = Path(spec.origin).parent / "static" / "mathjax"
    if not (src / FILES[0]).is_file():
        sys.exit(f"prepare_build: {src / FILES[0]} not found; is django-static-mathjax==3.2.2.1 installed?")
    return src


def main() -> int:
    src = mathjax_source()
    if DEST.parent.exists():
        shutil.rmtree(DEST.parent)
    for rel in FILES:
        (DEST / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, DEST / rel)
    shutil.copytree(src / FONT_DIR, DEST / FONT_DIR)
    n = sum(1 for p in DEST.rglob("*") if p.is_file())
    print(f"prepare_build: copied MathJax ({n} files) from {src} to {DEST.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
