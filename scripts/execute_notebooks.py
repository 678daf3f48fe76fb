"""Regenerate the executed ``chapters/NN_name.ipynb`` of every chapter from its ``chapters/NN_name.md``.

The Markdown notebook (Jupytext MyST) is the source of truth. Its paired ``.ipynb`` is committed with
outputs: it is nbval's regression baseline and the file Colab opens. Executing with
``nbclient.NotebookClient(record_timing=False)`` and writing with Jupytext gives reproducible files (no
timing metadata). The kernel is ``python3`` with ``PYTHONHASHSEED=0``; chapters fix their own seeds and
dtype. JAX platforms are not forced: the book runs on CPU and GPU alike.

Usage:
    python scripts/execute_notebooks.py                        # every chapter
    python scripts/execute_notebooks.py chapters/00_intro.md   # some chapters (.md or .ipynb paths)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
PATTERN = "[0-9][0-9]_*.md"
KERNEL = "python3"
TIMEOUT_S = 300  # per cell, as in _config.yml


def chapter_sources(args: list[str]) -> list[Path]:
    if not args:
        found = sorted(CHAPTERS.glob(PATTERN))
        if not found:
            sys.exit(f"execute_notebooks: no chapters matching {PATTERN} in {CHAPTERS}")
        return found
    sources = []
    for arg in args:
        md = Path(arg).resolve().with_suffix(".md")
        if not md.is_file():
            sys.exit(f"execute_notebooks: {md} does not exist")
        sources.append(md)
    return sources


def execute(md: Path) -> Path:
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(md)
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL:
        sys.exit(f"execute_notebooks: {md.name} declares kernel {kernel!r}; chapters use {KERNEL!r}")
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=TIMEOUT_S,
        record_timing=False,
        allow_errors=False,
        resources={"metadata": {"path": str(md.parent)}},
    )
    client.execute()
    ipynb = md.with_suffix(".ipynb")
    jupytext.write(nb, ipynb, fmt="ipynb")
    return ipynb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapter .md (or .ipynb) paths; default: all chapters")
    args = parser.parse_args(argv)
    os.environ["PYTHONHASHSEED"] = "0"  # inherited by the kernel
    for md in chapter_sources(args.chapters):
        start = time.perf_counter()
        ipynb = execute(md)
        print(f"executed {md.relative_to(ROOT)} -> {ipynb.relative_to(ROOT)} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
