"""Every exercise's check rejects the classic wrong answers (issue 18): each solution notebook is
run in-process with one wrong answer (tests/mutation_tables) in place of its solution, and a
cell tagged `check` must fail. A check that a misconception passes is a bug. The solutions
themselves must pass the same way (the control)."""

import contextlib
import functools
import importlib
import io
import linecache
import os
import re
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import nbformat
import pytest
from conftest import REPO_ROOT

from tfcourse.course.nbtools import BEGIN_SOLUTION, CHECK_TAG, END_SOLUTION

SOLUTIONS = REPO_ROOT / "solutions"
MIN_WRONG_ANSWERS = 2


def notebooks_with_tables() -> list[str]:
    return sorted(p.stem.removeprefix("m") for p in (REPO_ROOT / "tests" / "mutation_tables")
                  .glob("m*.py"))


@functools.cache
def solution(stem: str):
    """The solution notebook (read once: the cases below all consult it)."""
    return nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)


def table(stem: str) -> dict:
    return importlib.import_module(f"mutation_tables.m{stem}").MUTATIONS


def solution_functions(nb) -> dict[str, int]:
    """{function name: index of the code cell that defines it inside a solution block}."""
    found = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            for name in re.findall(r"^def (\w+)", cell.source, re.M):
                found[name] = index
    return found


def replace_solution(source: str, function: str, code: str) -> str:
    """`source` with the solution block of `function` replaced by `code` (same indent)."""
    lines, out, inside, seen_def = source.splitlines(), [], False, False
    for line in lines:
        if re.match(rf"def {function}\b", line):
            seen_def = True
        if seen_def and line.strip() == BEGIN_SOLUTION and not inside:
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(textwrap.indent(textwrap.dedent(code).strip("\n"), indent).splitlines())
            continue
        if inside:
            if line.strip() == END_SOLUTION:
                inside, seen_def = False, False
            continue
        out.append(line)
    assert not inside and out != lines, f"no solution block of {function}"
    return "\n".join(out)


def run(nb, replaced: dict[int, str] | None = None, stop_before: int | None = None,
        skip: frozenset[int] = frozenset()) -> tuple[int | None, str]:
    """Run the notebook's code cells in order in one namespace (cwd: solutions/), up to cell
    `stop_before` and leaving out the cells in `skip`; returns (index of the first failing
    cell or None, the failure). Stops at the first failure."""
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(SOLUTIONS)
    try:
        for index, cell in enumerate(nb.cells):
            if stop_before is not None and index >= stop_before:
                break
            if cell.cell_type != "code" or index in skip:
                continue
            source = (replaced or {}).get(index, cell.source)
            name = f"<solution cell {index}>"  # as IPython does, so inspect.getsource works
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(source, name, "exec"), namespace)
            except Exception as err:  # noqa: BLE001 - any failure is reported
                return index, f"{type(err).__name__}: {err}"
    finally:
        os.chdir(cwd)
        plt.close("all")
    return None, ""


def under_mpi(stem: str, function: str | None = None) -> bool:
    """Whether running the notebook (or one function's exercise, up to the next exercise)
    starts mpiexec jobs: a check under tfcourse.check, or an experiment cell's run_mpi."""
    nb = solution(stem)
    if function is None:
        return any("run_mpi(" in c.source or "check_under_mpi(" in c.source for c in nb.cells)
    starts = solution_functions(nb)
    later = [i for i in starts.values() if i > starts[function]]
    segment = nb.cells[starts[function]:min(later, default=len(nb.cells))]
    return any("run_mpi(" in c.source or "check_under_mpi(" in c.source for c in segment)


def earlier_mpi_checks(nb, before: int) -> frozenset[int]:
    """The check cells before cell `before` that only run an earlier exercise's function under
    mpiexec (the solution's, which passes: the control test runs them). Nothing later reads
    what they leave behind, and each takes seconds, so a wrong answer's run leaves them out."""
    return frozenset(i for i, c in enumerate(nb.cells[:before])
                     if CHECK_TAG in c.metadata.get("tags", []) and c.source.startswith(
                         "check_under_mpi(") and len(c.source.strip().splitlines()) == 1)


def case(stem: str, function: str, wrong: str):
    marks = [pytest.mark.mpi] if under_mpi(stem, function) else []
    return pytest.param(stem, function, wrong, marks=marks, id=f"{stem}-{function}-{wrong}")


CASES = [case(stem, function, wrong) for stem in notebooks_with_tables()
         for function, answers in table(stem).items() for wrong in answers]


@pytest.mark.parametrize("stem", [pytest.param(s, marks=[pytest.mark.mpi] if under_mpi(s) else [])
                                  for s in notebooks_with_tables()])
def test_the_solution_passes_and_every_exercise_has_wrong_answers(stem):
    nb = solution(stem)
    failed, why = run(nb)
    assert failed is None, f"the solution fails in cell {failed}: {why}"
    functions = solution_functions(nb)
    missing = {f: len(table(stem).get(f, {})) for f in functions
               if len(table(stem).get(f, {})) < MIN_WRONG_ANSWERS}
    assert not missing, f"exercises with fewer than {MIN_WRONG_ANSWERS} wrong answers: {missing}"
    assert set(table(stem)) <= set(functions), "the table names functions the notebook lacks"


@pytest.mark.parametrize("stem, function, wrong", CASES)
def test_a_check_rejects_the_wrong_answer(stem, function, wrong):
    """Runs up to the next exercise: its own checks must reject the wrong answer."""
    nb = solution(stem)
    index = solution_functions(nb)[function]
    source = replace_solution(nb.cells[index].source, function, table(stem)[function][wrong])
    later = [i for i in solution_functions(nb).values() if i > index]
    failed, why = run(nb, {index: source}, stop_before=min(later, default=None),
                      skip=earlier_mpi_checks(nb, index))
    assert failed is not None, f"no check rejected it: {wrong!r} passes {stem}'s checks"
    assert CHECK_TAG in nb.cells[failed].metadata.get("tags", []), (
        f"it failed outside a check cell (cell {failed}: {why}), so no check caught it")
