"""The README's figures stay in step with the measurements: every decimal number, percentage and
whole number >= 10 in the README's prose is written, digit for digit, in docs/results.md,
quality/*.md or the encodings' measured table in docs/loss-math.md (where each has its date or
command), outside sections marked pending. A README figure with no measurement behind it must say
it is pending, not be invented; a changed measurement must be changed in the README too."""

from __future__ import annotations

import re

from conftest import REPO

NOT_FIGURES = {"8.0"}
"""Numbers in the README's prose that are not measurements: compute capability 8.0 (Ampere)."""
NUMBER = re.compile(r"(?<![\w.])(\d+(?:,\d{3})*\.\d+(?:e-?\d+)?|\d+(?:\.\d+)?%)"  # decimals, percentages
                    r"|(?<![\w.,-])(\d{1,3}(?:,\d{3})+|\d{2,})(?![\w.%]|,\d)")  # whole numbers >= 10, not in names


def readme_prose(text: str) -> str:
    """The README without code blocks, table rows, inline code and link targets: its sentences."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def figures(text: str) -> list[str]:
    return list(dict.fromkeys(a or b for a, b in NUMBER.findall(readme_prose(text))))


def written_in(number: str, sources: str) -> bool:
    """``number`` as a whole number in ``sources`` (1.15 does not match 1.152)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", sources) is not None


def current_sections(page: str) -> str:
    """A results page without its sections marked ``**Pending:**`` (figures from older defaults,
    kept as a record, are not today's: the README may not quote them)."""
    return "".join(part for part in re.split(r"(?m)^(?=## )", page) if "**Pending:**" not in part)


def measured_text() -> str:
    pages = [REPO / "docs" / "results.md", REPO / "docs" / "loss-math.md", *sorted((REPO / "quality").glob("*.md"))]
    return "\n".join(current_sections(p.read_text(encoding="utf-8")) for p in pages)


def test_every_readme_figure_is_a_measured_one():
    found = figures((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(found) >= 10, found  # the README states figures; this test must see them
    sources = measured_text()
    missing = [n for n in found if n not in NOT_FIGURES and not written_in(n, sources)]
    assert not missing, (f"README figures not in docs/results.md, docs/loss-math.md or quality/*.md: {missing}; "
                         "record the measurement there (date, command) or mark the README's figure pending")


def test_the_check_finds_what_it_should():
    text = ("Held-out ppl 128.7 (`cache.top_k = 64.5`), 18% less, KL 4.1e-4 nats, 373 vs 1,024 on a P100\n"
            "with SmolLM2-135M, 2 seeds.\n| 999.9 | in a table |\n```\n777.7 in code\n```\nSee [x](a/1.2.md).")
    assert figures(text) == ["128.7", "18%", "4.1e-4", "373", "1,024"]
    page = "## A\nppl 373 (old)\n**Pending:** a rerun.\n## B\nppl 128.7\n"
    assert not written_in("373", current_sections(page)) and written_in("128.7", current_sections(page))
    assert written_in("1.15", "CI 0.9-1.15)") and not written_in("1.15", "CI 0.903-1.152")
    assert not written_in("3.6", "3.60 GiB") and written_in("3.60", "at 3.60 GiB")
