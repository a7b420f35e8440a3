"""Rules of the code base that a reviewer would otherwise check by hand (the issues "One clean house" and
"House 2.0"): no sys.path manipulation, no test hooks in the library, no references to documents outside the
repository; in ddpm_plus/ no function over 60 lines, no class over 300, no module over 600; relative imports
only, no import of another module's private names, no import cycle, and imports only go down the layers."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
LIBRARY = sorted((ROOT / "ddpm_plus").rglob("*.py"))
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 60, 300, 600
# Each module's layer: a module may import only from layers below its own (and from its own subpackage).
LAYERS = [
    ("schedulers",),
    ("models",),
    ("pipelines",),
    ("data", "image_grid", "redaction", "cache", "sharding"),
    ("evaluation",),
    ("hub",),
    ("trainer",),
    ("conversion",),
    ("cli", "train", "evaluate", "__init__"),
]


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
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY if pattern.search(p.read_text())]
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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """The layer index of module ``ddpm_plus.<top>...``; the package itself is the top layer."""
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _is_module(dotted: str) -> bool:
    path = ROOT / Path(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, imported ddpm_plus module, imported names) of every import in ``source`` (the code of ``module``),
    nested ones included; ``from . import x`` counts as importing the submodule x where there is one."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names if a.name.startswith("ddpm_plus"))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        if not target.startswith("ddpm_plus"):
            continue
        names = [a.name for a in node.names]
        submodules = [n for n in names if _is_module(f"{target}.{n}")]
        out.extend((node.lineno, f"{target}.{n}", []) for n in submodules)
        if len(submodules) < len(names):
            out.append((node.lineno, target, [n for n in names if n not in submodules]))
    return out


def import_problems(source: str, module: str, is_package: bool = False) -> list[str]:
    problems = [
        f"absolute import: {m.strip()}" for m in re.findall(r"^\s*(?:from|import) ddpm_plus\b.*$", source, re.M)
    ]
    for line, target, names in imports_of(source, module, is_package):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        if private:
            problems.append(f"{line}: private {private} from {target}")
        same_subpackage = target.split(".")[:2] == module.split(".")[:2]
        if not same_subpackage and layer_of(target) > layer_of(module):
            problems.append(f"{line}: upward import of {target}")
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_sizes(path):
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE, f"{lines} lines"
    long = [
        (n.name, n.end_lineno - n.lineno + 1)
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION
        or isinstance(n, ast.ClassDef)
        and n.end_lineno - n.lineno + 1 > MAX_CLASS
    ]
    assert not long, long


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_imports_of_public_names_down_the_layers(path):
    assert not import_problems(path.read_text(), module_name(path), path.name == "__init__.py")


def test_no_import_cycles():
    graph = {}
    for path in LIBRARY:
        this = module_name(path)
        targets = {t for _, t, _ in imports_of(path.read_text(), this, path.name == "__init__.py")}
        # a package's __init__ re-exporting its own submodules is not a cycle of the code
        graph[this] = {t for t in targets if t != this and not (path.name == "__init__.py" and t.startswith(this))}
    assert not find_cycles(graph)


def test_the_rules_find_what_they_are_for():
    planted = "from ..pipelines.pipeline_ddpm_plus import _accepts\nfrom ddpm_plus import hub\n"
    problems = import_problems(planted, "ddpm_plus.schedulers.fake")
    assert any("private ['_accepts']" in p for p in problems)
    assert any("upward import of ddpm_plus.pipelines.pipeline_ddpm_plus" in p for p in problems)
    assert any("absolute import: from ddpm_plus import hub" in p for p in problems)
    assert not import_problems("from .options import VarianceType\n", "ddpm_plus.schedulers.fake")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
