"""Rules of the code base that a reviewer would otherwise check by hand (the issue "One clean house"):
no sys.path manipulation, no test hooks in the library, no references to documents outside the
repository, and no function over 60 lines in the scheduler or the trainer."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()


def tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): every file under the root
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts]
    else:
        files = [ROOT / line for line in out.stdout.splitlines()]
    return [p for p in files if p.suffix in suffixes and p.is_file() and p.resolve() != THIS]


def test_no_sys_path_manipulation():
    offenders = [str(p.relative_to(ROOT)) for p in tracked(".py") if "sys.path" in p.read_text()]
    assert not offenders, offenders


def test_library_has_no_test_hooks():
    pattern = re.compile(r"DDPM_PLUS_TEST|PYTEST_CURRENT_TEST")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "ddpm_plus").glob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_no_references_to_documents_outside_the_repository():
    banned = re.compile(r"shared/notes|shared/seed|ddpm-math-zh|notes/math\.md|seed eq|seed tutorial", re.I)
    offenders = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in tracked(".py", ".md", ".sh", ".yaml", ".toml")
        for m in [banned.search(p.read_text())]
        if m
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "module", ["schedulers/scheduling_ddpm_plus.py", "trainer/loop.py", "trainer/args.py", "trainer/checkpointing.py"]
)
def test_no_function_over_60_lines(module):
    tree = ast.parse((ROOT / "ddpm_plus" / module).read_text())
    long = [
        (n.name, n.end_lineno - n.lineno + 1)
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60
    ]
    assert not long, long
