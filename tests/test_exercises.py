"""Exercises are generated from solutions, and their checks fail on the stubs."""

import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

from tfcourse.course.nbtools import CHECK_TAG, generate_exercises

SOLUTIONS = sorted((REPO_ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((REPO_ROOT / "exercises").glob("*.ipynb"))


def test_exercises_are_in_sync_with_solutions():
    stale = generate_exercises(REPO_ROOT / "solutions", REPO_ROOT / "exercises", check_only=True)
    assert stale == [], f"out of date: {stale}; run `make exercises`"


def _check_cells(nb):
    return [c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_solution_has_exercises_and_checks(path):
    nb = nbformat.read(path, as_version=4)
    assert any("### BEGIN SOLUTION" in c.source for c in nb.cells if c.cell_type == "code")
    assert _check_cells(nb), f"{path.name} has no cell tagged '{CHECK_TAG}'"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_checks_fail_on_the_stubs(path):
    """Run the untouched exercise: every check cell must fail (a check that cannot fail is
    a defect). The solution notebooks, run by nbval, show the same checks passing."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    for cell in _check_cells(nb):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors, f"{path.name}: this check passed on the stub:\n{cell.source}"
        assert errors[0].ename in {"NotImplementedError", "AssertionError"}, (
            f"{path.name}: check failed with {errors[0].ename}, not the stub's "
            f"NotImplementedError or a failed check:\n{cell.source}"
        )
