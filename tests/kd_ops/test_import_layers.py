"""The project's modules import each other in layers: no module imports, at the top or inside a
function, a module that imports it back, directly or through others. (tests/workflows/test_pipeline.py
follows the config through a real run for calls that go back up.)"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    name, found = _module(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found |= {full} if full in known else {base} if base in known else set()
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = [p for d in ("kd_ops", "workflows") for p in (ROOT / d).rglob("*.py")]
    known = {_module(p) for p in files}
    return {_module(p): _imports(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it."""
    found, done = [], set()

    def visit(m: str, path: list[str]) -> None:
        for n in sorted(graph.get(m, ())):
            if n in path:
                cycle = path[path.index(n):]
                if frozenset(cycle) not in done:
                    done.add(frozenset(cycle))
                    found.append(cycle + [n])
            elif n not in seen:
                seen.add(n)
                visit(n, path + [n])

    for start in sorted(graph):
        seen = {start}
        visit(start, [start])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"workflows.pipeline", "workflows.stages.student", "workflows.tasks", "kd_ops.store"} <= set(graph)
    assert "workflows.stages.student" in graph["workflows.pipeline"]  # the graph sees imports
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


STAGES = {f"workflows.stages.{s}" for s in ("inputs", "teachers", "soft_labels", "chain", "search", "student", "ship")}
UNDER_STAGES = {f"workflows.stages.{s}" for s in ("fit", "training_data", "store_pass", "target")}


def test_a_stage_imports_only_the_layer_under_it_and_only_the_top_calls_stages():
    graph = import_graph()
    package = {m for m in graph if m.startswith("workflows.stages.")}
    assert package == STAGES | UNDER_STAGES  # a new module in the package says which layer it is in
    for stage in STAGES:
        assert not graph[stage] & (STAGES - {stage}), (stage, graph[stage] & STAGES)
    for low in UNDER_STAGES:
        assert not graph[low] & STAGES, (low, graph[low] & STAGES)
    callers = {m for m, deps in graph.items() if deps & STAGES and m not in package}
    # kd run; kd precompute / train / tune; the benchmarks that run the pipeline's stages
    assert callers <= {"workflows.pipeline", "workflows.commands", "workflows.bench.methods_bench", "workflows.bench.tune_bench"}, callers
