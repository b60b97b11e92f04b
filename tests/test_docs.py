"""The documents' links lead somewhere: every ``(#anchor)`` names a heading of its page
(as GitHub makes anchors of headings), every relative link a file of the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/guide/README.md", "docs/benchmarks.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped,
    spaces made hyphens (``Export: ONNX, TFLite`` -> ``export-onnx-tflite``)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    body = re.sub(r"```.*?```", "", text, flags=re.S)  # a '# comment' in code is no heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", body, re.M)}


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Your data: the layouts `--data-dir` reads") == (
        "your-data-the-layouts---data-dir-reads")
    assert github_anchor("Coming from milesial/Pytorch-UNet") == "coming-from-milesialpytorch-unet"


@pytest.mark.parametrize("page", PAGES)
def test_every_link_of_a_page_leads_somewhere(page):
    path = ROOT / page
    text = path.read_text()
    body = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # code
    own = anchors(text)
    broken = []
    for target in LINK.findall(body):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if file and not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md" and anchor not in (
                own if not file else anchors(where.read_text())):
            broken.append(target)
    assert broken == [], f"{page}: links that lead nowhere: {broken}"
