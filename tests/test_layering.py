"""The package's architecture, enforced: layers import downwards only, the model package
imports nothing else of the course and never MPI, no import cycles, and every parallel program
stays short enough to read top to bottom.

Layers, lowest first (a module may import its own layer and the ones below):
  0 tfcourse.nn                      the model and its maths
  1 files, data, checkpoint,         I/O and the corpus; the process's malloc settings
    allocator
  2 train, threaded                  the serial training loop (the reference); its threads
  3 parallel.plans                   MPI-free: how to split
  4 perf                             hardware, cost model, planner, FAQ experiments
  5 course.launch                    starting mpiexec jobs (no MPI in the process itself)
  6 parallel.program, parallel.comm, the program skeleton, the collectives (MPI), checkpoints
    parallel.checkpointing
  7 parallel programs                data_parallel, tensor_parallel, ... (MPI)
  8 parallel.study, hello shim,      runners over the programs
    check (learner code under MPI)
  9 course                           notebooks' tooling: check, nbtools, widgets, viz
"""

import ast

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "tfcourse"

LAYERS = [  # (module-name prefix, layer); the longest matching prefix wins
    ("tfcourse.nn", 0),
    ("tfcourse.files", 1), ("tfcourse.data", 1), ("tfcourse.checkpoint", 1),
    ("tfcourse.allocator", 1),
    ("tfcourse.train", 2), ("tfcourse.threaded", 2),
    ("tfcourse.parallel.plans", 3),
    ("tfcourse.perf", 4),
    ("tfcourse.course.launch", 5),
    ("tfcourse.parallel.program", 6), ("tfcourse.parallel.comm", 6),
    ("tfcourse.parallel.checkpointing", 6),
    ("tfcourse.parallel", 7),
    ("tfcourse.parallel.study", 8), ("tfcourse.hello", 8), ("tfcourse.check", 8),
    ("tfcourse.course", 9),
]
MPI_ALLOWED = ("tfcourse.parallel.program", "tfcourse.parallel.comm", "tfcourse.parallel.")
PROGRAM_LINE_LIMIT = 340  # "about 300 lines, readable top to bottom"


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    matches = [(len(prefix), rank) for prefix, rank in LAYERS
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name}: not in the layer table of tests/test_layering.py"
    return max(matches)[1]


def imports(path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def course_imports(name: str) -> set[str]:
    """The tfcourse modules `name` imports (`from pkg import mod` counts as mod)."""
    return {m for m in imports(MODULES[name]) if m in MODULES and m != name
            and not MODULES[m].name == "__init__.py"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downwards_only(name):
    upward = sorted(m for m in course_imports(name) if layer(m) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("tfcourse.nn")))
def test_the_model_package_imports_only_numpy_and_itself(name):
    outside = sorted(m for m in imports(MODULES[name])
                     if m.split(".")[0] not in ("numpy", "__future__", "math", "dataclasses",
                                                "collections", "numbers", "typing")
                     and not m.startswith("tfcourse.nn"))
    assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_mpi_programs_import_mpi(name):
    if any(m.startswith("mpi4py") for m in imports(MODULES[name])):
        assert name.startswith(MPI_ALLOWED) and not name.startswith("tfcourse.parallel.plans"), (
            f"{name} imports mpi4py: only the programs under tfcourse.parallel may")


def test_no_import_cycles():
    graph = {name: course_imports(name) for name in MODULES}
    state = {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for target in sorted(graph[name]):
            visit(target, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_layer_table_catches_an_upward_import(tmp_path):
    """The check itself can fail: the model importing the planner is reported."""
    fake = tmp_path / "fake.py"
    fake.write_text("from tfcourse.perf import planner\n")
    assert "tfcourse.perf.planner" in imports(fake)
    assert layer("tfcourse.perf.planner") > layer("tfcourse.nn.model")


PROGRAMS = sorted(p for p in (PACKAGE / "parallel").glob("*.py")
                  if p.name not in ("__init__.py",))


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.name)
def test_parallel_programs_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= PROGRAM_LINE_LIMIT, f"{path.name}: {lines} lines"
