"""Notebooks are committed executed, so nbval's strict comparison means something.

nbval passes trivially on a notebook without stored outputs; these tests make sure every
notebook in notebooks/ and solutions/ was run top to bottom in one fresh kernel, holds real
outputs and no errors, and only ignores outputs that are timings or measurements.
"""

import nbformat
import pytest
from conftest import REPO_ROOT

COMMITTED = sorted((REPO_ROOT / "notebooks").glob("*.ipynb")) + sorted(
    (REPO_ROOT / "solutions").glob("*.ipynb")
)
IGNORE_MARK = "# NBVAL_IGNORE_OUTPUT"
IGNORE_REASONS = ("timing", "measured", "widget")


def code_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def test_there_are_notebooks_to_check():
    assert any(p.parent.name == "notebooks" for p in COMMITTED)
    assert any(p.parent.name == "solutions" for p in COMMITTED)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_executed_in_order_without_errors(path):
    cells = code_cells(path)
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; run `make notebooks` to execute it top to "
        "bottom in a fresh kernel"
    )
    if path.parent.name == "solutions":  # definitions print nothing; every check says "✓"
        silent = [c.source[:60] for c in cells
                  if "check" in c.metadata.get("tags", []) and not c.outputs]
        assert silent == [], f"{path.name}: check cells without stored output: {silent}"
    else:
        assert sum(len(c.outputs) for c in cells) >= len(cells) // 2, "too few stored outputs"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert errors == [], f"{path.name} was committed with an error output"
    assert all("NBVAL_SKIP" not in c.source for c in cells), "cells must not be skipped"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ignored_outputs_say_why(path):
    """nbval needs the marker alone on its line; the next line must give the reason."""
    for cell in code_cells(path):
        lines = cell.source.splitlines() + [""]
        if IGNORE_MARK in cell.source:
            assert lines[0] == IGNORE_MARK and lines[1].startswith("#") and any(
                reason in lines[1].lower() for reason in IGNORE_REASONS
            ), f"{path.name}: '{lines[1]}' must say it hides a timing, measurement or widget"


MPI_MODULES = ("mpi4py", "tfcourse.hello", "tfcourse.parallel.comm", "tfcourse.parallel.program",
               "tfcourse.parallel.data_parallel", "tfcourse.parallel.tensor_parallel",
               "tfcourse.parallel.pipeline_parallel", "tfcourse.parallel.hybrid",
               "tfcourse.parallel.sequence_parallel", "tfcourse.parallel.task_parallel",
               "tfcourse.parallel.hello", "tfcourse.parallel.expert_parallel",
               "tfcourse.parallel.context_parallel", "tfcourse.parallel.ring_attention",
               "tfcourse.parallel.inference")


@pytest.mark.parametrize("path", COMMITTED + sorted((REPO_ROOT / "exercises").glob("*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_mpi_inside_the_notebook_kernel(path):
    """Importing mpi4py.MPI initialises MPI in the kernel; notebooks start real jobs with
    tfcourse.course.launch instead, and use the MPI-free tfcourse.parallel.plans helpers."""
    for cell in code_cells(path):
        for line in cell.source.splitlines():
            words = line.replace(",", " ").split()
            if words[:1] in (["import"], ["from"]):
                assert not any(w.startswith(MPI_MODULES) for w in words[1:2]), (path.name, line)
