"""The README stays a short user guide and no page links to a file that is not in the repository."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "CHANGELOG.md", "weights/README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    folder = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = os.path.normpath(os.path.join(folder, target.split("#")[0]))
        if not path.startswith(ROOT) or not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{page}: dangling links {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_no_reference_outside_the_repository(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    for name in ("DESIGN.md", "papers.md", "../shared"):
        assert name not in text, f"{page} cites {name}"
