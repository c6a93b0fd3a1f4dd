"""README.md and docs/*.md: every relative link resolves; the README stays the front door (issue 37)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Written by other work; a link to them may precede the file itself.
MAY_BE_MISSING = {ROOT / "docs" / "default_job_metrics.png", ROOT / "docs" / "evaluation.md"}

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" may follow).
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _markdown_files():
    return [README] + sorted(DOCS.glob("*.md"))


def _links(path):
    """(line number, target) of every markdown link outside fenced code blocks and inline code."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        for match in LINK.finditer(re.sub(r"``[^`]*``|`[^`]*`", "", line)):
            out.append((number, match.group(1)))
    return out


def _relative(target):
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
        return None  # http(s), mailto, ...
    path = target.split("#", 1)[0].split("?", 1)[0]
    return path or None  # a pure #anchor


def test_docs_folder_exists():
    assert DOCS.is_dir() and list(DOCS.glob("*.md"))


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for number, target in _links(path):
        rel = _relative(target)
        if rel is None:
            continue
        resolved = (path.parent / rel).resolve()
        if resolved.exists() or resolved in MAY_BE_MISSING:
            continue
        broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_pattern_finds_links():
    links = [target for _, target in _links(README)]
    assert "docs/default_job_metrics.png" in links
    assert "docs/evaluation.md" in links
    assert any(t.startswith("docs/") and t.endswith(".md") for t in links)


def test_readme_is_the_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for command in (
        "pip install torch==2.13.0",
        "cuig fit --config configs/seq12.yaml",
        'python -m pytest -m "not slow" -q',
    ):
        assert command in text, command


def test_readme_links_every_docs_page():
    linked = {(README.parent / rel).resolve() for _, t in _links(README) if (rel := _relative(t))}
    missing = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
