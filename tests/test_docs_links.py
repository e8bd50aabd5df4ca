"""The README and docs/ link only to what exists inside the repository.

Every relative Markdown link of README.md and docs/*.md must name a file of the
repository and, with a ``#fragment``, a heading of that file (slugged the way GitHub
renders anchors); no link may leave the repository (a sibling directory of the
checkout and the like), and no file names a path outside it.
Every repository path the pages name in code spans (`workers/storage/group.py`,
`tests/worker/`) must exist, so that moving a module shows which page to update.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PACKAGES = "receiver|workers|metrics|loadtest|benchmarks|tests"
_NAMED_PATH = re.compile(rf"`((?:{_PACKAGES})/[^`\s:]*)")
_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text()))


def test_slug_matches_github() -> None:
    assert slug("Durability (`--fsync always`) and group commit") == (
        "durability---fsync-always-and-group-commit"
    )
    assert slug("Storage commitment and query/retrieve") == "storage-commitment-and-queryretrieve"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_inside_the_repository(page: Path) -> None:
    found = links(page)
    assert found or page.name != "README.md", "the README links its docs"
    for link in found:
        if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(REPO), f"{page.name}: {link} leaves the repository"
        assert target.exists(), f"{page.name}: {link}: no such file"
        if fragment:
            assert fragment in anchors(target), f"{page.name}: {link}: no such heading"


def test_docs_pages_are_linked_from_the_readme() -> None:
    readme = set(links(REPO / "README.md"))
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from README.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(page: Path) -> None:
    named = _NAMED_PATH.findall(page.read_text())
    missing = sorted({path for path in named if not (REPO / path).exists()})
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


#: text files of the repository that a reader (or a docstring) might send elsewhere
_TEXT_SUFFIXES = {".py", ".pyx", ".md", ".toml", ".cfg", ".yml", ".service", ".txt"}
#: a sibling directory of the checkout, or the machine the project was written on:
#: neither exists for someone who has only the repository
_OUTSIDE = re.compile(r"\.\./" + "shared" + r"|(?<![\w.])/" + "work" + r"/")


def test_no_file_names_a_path_outside_the_repository() -> None:
    offenders = []
    for top in (
        "README.md",
        "docs",
        "receiver",
        "workers",
        "metrics",
        "loadtest",
        "benchmarks",
        "deploy",
        "tests",
    ):
        root = REPO / top
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in files:
            if path.suffix not in _TEXT_SUFFIXES or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
