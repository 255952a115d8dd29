"""The documentation holds together: every relative link in README.md and docs/*.md points to a
file that exists (and, with a #fragment, to a heading in it), the README stays the user's short
page with the two commands, and the project stands alone (no links outside the repository's own
files)."""

import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# Pages other branches write at the same time (the seed's Kaggle run, the GPU check). Links to
# them are allowed while they are missing; once they exist, they are checked like any other.
WRITTEN_ELSEWHERE = {"docs/seed-run.md", "docs/gpu-check.md"}


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a `[x](y)` in code is not a link)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if not dest.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            if rel not in WRITTEN_ELSEWHERE:
                broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {rel})")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_the_link_checker_finds_links_and_headings():
    readme = REPO / "README.md"
    assert "docs/results.md" in relative_links(readme)
    assert slug("The precision policy (P100 / T4 and newer cards)") == "the-precision-policy-p100--t4-and-newer-cards"
    assert slug("Memory: no `[B, L, V]` tensor, and a planner") == "memory-no-b-l-v-tensor-and-a-planner"
    assert "quick-start-offline-cpu-two-commands" in anchors(readme)


def test_readme_is_the_users_short_page_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert "make demo" in text and "make test" in text


# Written in pieces so that this file does not itself cite them.
OUTSIDE = ("DESIGN" + ".md", ".." + "/shared")


def test_every_doc_is_indexed_and_nothing_cites_files_outside_the_project():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        if page.parent.name == "docs" and page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"
        text = page.read_text(encoding="utf-8")
        for outside in OUTSIDE:  # files a reader of this project never sees
            assert outside not in text, (page, outside)
