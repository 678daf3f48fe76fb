"""Fail when a chapter's ``.ipynb`` is not in sync with its ``.md`` (or one of the pair is missing).

For every ``chapters/NN_name.md`` there must be a ``chapters/NN_name.ipynb`` and vice versa. On copies
of both, ``jupytext --to ipynb --update`` rebuilds the notebook's inputs from the Markdown while keeping
its outputs; the result must equal the committed ``.ipynb`` byte for byte. This is the
``jupytext --update`` + ``git diff --exit-code`` recipe without needing git (``jupytext --diff`` exits 0
and cannot gate). Fix a failure with ``python scripts/execute_notebooks.py chapters/NN_name.md``.

Usage: python scripts/check_sync.py
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
PATTERN = "[0-9][0-9]_*"


def main() -> int:
    mds = {p.stem: p for p in CHAPTERS.glob(PATTERN + ".md")}
    nbs = {p.stem: p for p in CHAPTERS.glob(PATTERN + ".ipynb")}
    problems = [f"chapters/{s}.md has no chapters/{s}.ipynb" for s in sorted(mds.keys() - nbs.keys())]
    problems += [f"chapters/{s}.ipynb has no chapters/{s}.md" for s in sorted(nbs.keys() - mds.keys())]
    pairs = sorted(mds.keys() & nbs.keys())
    if not mds and not nbs:
        problems.append(f"no chapters matching {PATTERN}.md in {CHAPTERS}")
    if pairs:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for stem in pairs:
                shutil.copy2(mds[stem], tmp / mds[stem].name)
                shutil.copy2(nbs[stem], tmp / nbs[stem].name)
            cmd = [sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--update"]
            subprocess.run(cmd + [str(tmp / mds[s].name) for s in pairs], check=True)
            for stem in pairs:
                committed = nbs[stem].read_text(encoding="utf-8")
                updated = (tmp / nbs[stem].name).read_text(encoding="utf-8")
                if committed != updated:
                    diff = difflib.unified_diff(committed.splitlines(), updated.splitlines(),
                                                f"chapters/{stem}.ipynb", f"chapters/{stem}.md (as .ipynb)",
                                                n=1, lineterm="")
                    problems.append(f"chapters/{stem}.ipynb is out of sync with chapters/{stem}.md:\n"
                                    + "\n".join(list(diff)[:40]))
    for problem in problems:
        print(f"check_sync: {problem}", file=sys.stderr)
    if problems:
        print("check_sync: FAILED; regenerate with: python scripts/execute_notebooks.py [chapters/NN_name.md]",
              file=sys.stderr)
        return 1
    print(f"check_sync: {len(pairs)} chapter notebook(s) in sync with their Markdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
