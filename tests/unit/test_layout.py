"""The project's shape: imports inside mova/ go one way, mova/ knows nothing of Ray, the Ray
layer holds no model code, pipelines/ stages are siblings on common/, imports sit at the top of
modules, and modules and functions stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
ORCHESTRATORS = {"demo", "bench"}  # stages that run other stages and may import them
# Imports that may sit inside a function: optional readers (installed with the `real` extra or
# with the weight packages), and the module that settles the environment before Ray loads.
LAZY_ALLOWED = {"onnx", "onnxruntime", "easy_vqa", "transformers.initialization"}
LAZY_ALLOWED_IN = {"pipelines.common.ray_init": {"ray"},
                   # optional, ~9 s to import: only replicas that run vLLM import it
                   "pipelines.serve.llm": {"pipelines.serve.vllm_engine"},
                   "pipelines.evaluate.workers": {"pipelines.evaluate.vllm_decode"},
                   "pipelines.bench.cli": {"pipelines.bench"},  # its sub-command dispatch
                   "pipelines.bench.engine_cli": {"pipelines.bench"}}


def _modules(package: str) -> dict[str, Path]:
    mods = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module named by an import anywhere in the file (lazy ones inside functions and
    ``TYPE_CHECKING`` blocks included), relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    graph = {}
    for mod, path in mods.items():
        targets = _imports(path, mod, path.name == "__init__.py") & set(mods)
        # a package re-exporting its own children is not a cycle
        graph[mod] = {t for t in targets if t != mod and not mod.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_lazy_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\nx = 1\n")
    (pkg / "c.py").write_text("from .a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert find_cycles(import_graph("pkg")) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_inside_mova():
    cycles = find_cycles(import_graph("mova"))
    assert not cycles, "import cycles in mova/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_mova_never_imports_ray():
    offenders = [mod for mod, path in _modules("mova").items()
                 if any(n == "ray" or n.startswith("ray.")
                        for n in _imports(path, mod, path.name == "__init__.py"))]
    assert not offenders, f"mova/ must not import Ray: {offenders}"


def test_pipelines_define_no_torch_modules():
    """Model math lives in mova/; the Ray layer calls it."""
    offenders = []
    for mod, path in _modules("pipelines").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"nn.Module", "torch.nn.Module", "Module"}:
                    offenders.append(f"{mod}.{node.name}")
    assert not offenders, f"torch modules defined in pipelines/: {offenders}"


def test_modules_stay_small():
    big = {f"{mod} ({n})": n for package in ("mova", "pipelines")
           for mod, path in _modules(package).items()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them): {sorted(big)}"


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "pipelines" else None


def test_pipelines_stages_import_only_common_and_themselves():
    """A stage imports ``mova``, ``pipelines.common`` and itself; demo and bench orchestrate."""
    graph = import_graph("pipelines")
    sideways = sorted(f"{mod} -> {target}" for mod, targets in graph.items()
                      if (stage := _stage(mod)) and stage not in ORCHESTRATORS
                      for target in targets
                      if _stage(target) not in (None, stage, "common"))
    assert not sideways, "imports between stages (move what they share to common/): " + \
        "; ".join(sideways)


def test_no_import_cycle_inside_pipelines():
    cycles = find_cycles(import_graph("pipelines"))
    assert not cycles, "import cycles in pipelines/: " + "; ".join(" <-> ".join(c)
                                                                   for c in cycles)


def _function_imports(path: Path) -> list[tuple[int, str]]:
    found = []

    def walk(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif inside and isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.lineno, ("." * child.level) + child.module))
            walk(child, inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(ast.parse(path.read_text()), False)
    return found


def test_imports_sit_at_the_top_of_modules():
    lazy = []
    for package in ("mova", "pipelines"):
        for mod, path in _modules(package).items():
            allowed = LAZY_ALLOWED | LAZY_ALLOWED_IN.get(mod, set())
            lazy += [f"{mod}:{line} {name}" for line, name in _function_imports(path)
                     if not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert not lazy, f"imports inside functions (move them to the top): {lazy}"


def test_functions_stay_short():
    long = []
    for package in ("mova", "pipelines"):
        for mod, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{mod}.{node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
