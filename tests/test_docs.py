"""The guide in docs/ builds without warnings (mkdocs --strict: every page in the nav, every link valid), and the
project's docs stand alone: nothing points at files outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "site" / "design" / "index.html").is_file()


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(f"docs/{p}" in readme for p in pages)


def test_no_reference_to_files_outside_the_repository():
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src").rglob("*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text and "DESIGN §" not in text and "../shared" not in text, path
