"""Every code block in README.md and the docs site (docs/**/*.md) runs: Python blocks are executed,
the bash set-up commands are the ones .ci/run and the examples use."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH = re.findall(r"```bash\n(.*?)```", README, re.S)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# Sections whose blocks each take over ~10 s on 2 cores and repeat what their own test modules
# check: marked slow, so CI stays within its budget (run them with -m slow). A block's section is
# the last Markdown heading above it, wherever the section lives (README or docs page).
SLOW_SECTIONS = (
    "Layer state",
    "Attention and the Transformer",
    "Attention for the models people train",
    "A GPT, end to end",
    "Sweeps compile once",
    "Long runs",
    "The optimizer toolbox",
    "Precision",
    "Data larger than memory",
    "Models larger than one device",
)


def _blocks(path):
    """(section, code) for each ```python block of a Markdown file; headings inside code blocks
    (Python comments) are not headings."""
    text = path.read_text()
    blocks, section = [], ""
    for part in re.split(r"(```[a-z]*\n.*?```)", text, flags=re.S):
        if part.startswith("```python\n"):
            blocks.append((section, part[len("```python\n") : -3]))
        elif not part.startswith("```"):
            headings = re.findall(r"^#+ (.*)$", part, re.M)
            section = headings[-1] if headings else section
    return blocks


BLOCKS = [
    (path.relative_to(ROOT).as_posix(), i, section, code)
    for path in PAGES
    for i, (section, code) in enumerate(_blocks(path))
]
PYTHON = [code for page, _, _, code in BLOCKS if page == "README.md"]


@pytest.mark.parametrize(
    "page, index, section, code",
    [
        pytest.param(
            *block, marks=[pytest.mark.slow] if block[2].startswith(SLOW_SECTIONS) else [], id=f"{block[0]}:{block[1]}"
        )
        for block in BLOCKS
    ],
)
def test_python_block_runs(page, index, section, code, tmp_path):
    """Run in a fresh interpreter, as a user pasting it would (default JAX settings)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, f"{page} block {index} ({section}):\n{code}\n{done.stderr}"


def test_readme_and_docs_have_code():
    assert len(PYTHON) >= 1
    assert len(BLOCKS) >= 20


def test_every_docs_page_is_in_the_site():
    """A page left out of mkdocs.yml's nav would still be built, but no reader would find it."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert pages and [p for p in pages if p not in nav] == []


def test_setup_commands_are_the_ones_ci_and_the_examples_use():
    commands = [line.strip() for block in BASH for line in block.splitlines() if line.strip()]
    assert 'pip install -e ".[test]" && pytest' in commands
    assert (ROOT / ".ci" / "run").read_text().count('pip install -e ".[test]" && pytest') == 1
    run_example = next(c for c in commands if "examples/" in c)
    assert run_example.startswith('pip install -e ".[examples]" && python examples/')
    assert (ROOT / run_example.split("python ")[-1]).is_file()


def test_every_public_name_is_on_a_reference_page():
    """A new name in funcnet.__all__ fails here until a reference page lists it (its module's
    `::: funcnet.<module>` block with the name among its `members`): docs/gen_reference.py writes them."""
    import funcnet

    listed = {}
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        text = page.read_text()
        for module in re.findall(r"^::: (\S+)", text, re.M):
            for name in re.findall(r"^ +- (\w+)$", text, re.M):
                listed[name] = module
    missing = [n for n in funcnet.__all__ if listed.get(n) != getattr(funcnet, n).__module__]
    assert missing == [], f"not on a reference page: {missing}; run python docs/gen_reference.py"


def test_readme_links_reach_the_docs():
    """The README's relative links (to docs/*.md, read on GitHub) name files that exist, and their
    anchors headings of those files (mkdocs build --strict checks the links between docs pages)."""
    links = re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]+))?\)", README)
    assert links
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{target}#{anchor}"
