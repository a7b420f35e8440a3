"""The README stays true: every Python example runs as written, the Quickstart has its two commands, and every
relative link in README.md and docs/*.md points to an existing file (and heading, for a #fragment)."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")


def python_blocks(text: str) -> list[str]:
    return [code for lang, code in FENCE.findall(text) if lang == "python"]


def test_every_python_example_runs_in_order(tmp_path, monkeypatch):
    """All ```python blocks, top to bottom, in one namespace, in an empty directory (as a new user would)."""
    blocks = python_blocks(README)
    assert len(blocks) >= 5 and blocks[0].startswith("import ddpm_plus")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"README.md, python example {number}", "exec"), namespace)
        if number == 1:
            assert (tmp_path / "my-ddpm" / "model_index.json").exists()
            assert namespace["images"].shape == (4, 16, 16, 1)
        if 'class_labels=["3", "7"]' in code:  # class labels set the batch size
            assert len(namespace["images"]) == 2
    assert len(namespace["images"]) == 4 and namespace["gamma"].shape == (1000,)


def test_quickstart_has_exactly_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    assert len(commands) == 2
    assert "accelerate launch -m ddpm_plus.train --config digits" in commands[0] and "pip install" in commands[0]
    assert "pytest" in commands[1] and "pip install" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci and "python -m pytest -q tests" in commands[1]


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    without_code = FENCE.sub("", text)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code, re.M):
        slug = github_anchor(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_github_anchor():
    assert github_anchor("Likelihood: exact bits/dim") == "likelihood-exact-bitsdim"
    assert github_anchor("Differences from diffusers' DDPMScheduler") == "differences-from-diffusers-ddpmscheduler"
    assert (
        github_anchor("Quality on the bundled digits (measured, CPU)") == "quality-on-the-bundled-digits-measured-cpu"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, broken
