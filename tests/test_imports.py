"""Import rules: the engine never imports streamlit, the store sits low, and no two modules of
cinf_core import each other (function-level imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cinf_core"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ``modules`` (or external top-level package) that ``name`` imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:None if is_package else -1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                       for a in node.names]
        for target in targets:
            while target not in modules and "." in target and target.startswith("cinf_core"):
                target = target.rsplit(".", 1)[0]
            found.add(target if target in modules else target.split(".")[0])
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_engine_never_imports_streamlit():
    offenders = sorted(m for m, deps in _graph().items() if "streamlit" in deps)
    assert offenders == []


def test_the_store_imports_nothing_above_data_models_and_concept_records():
    allowed = {"cinf_core.data", "cinf_core.models", "cinf_core.paths", "cinf_core.concepts.base"}
    inside = {d for d in _graph()["cinf_core.store"] if d.startswith("cinf_core")}
    assert inside <= allowed, inside - allowed


def test_no_import_cycles():
    graph = {m: {d for d in deps if d.startswith("cinf_core")} for m, deps in _graph().items()}
    mutual = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert mutual == []
    # longer cycles too: depth-first search for a back edge
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep])
                return True
            if dep not in state and visit(dep, stack + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), cycle


def test_pages_reach_the_engine_through_public_modules_only():
    """Pages never import a private engine module or compute gradients themselves."""
    for page in sorted((ROOT / "pages").glob("*.py")):
        text = page.read_text()
        assert "import torch" not in text and ".backward(" not in text, page.name
