"""Notebook tooling: generate exercises from solutions, and re-execute notebooks.

    python -m tfcourse.course.nbtools exercises            # solutions/*.ipynb -> exercises/*.ipynb
    python -m tfcourse.course.nbtools exercises --check    # exit 1 if exercises/ is out of date
    python -m tfcourse.course.nbtools execute notebooks/*.ipynb solutions/*.ipynb

Solution notebooks are the single source. Code between `### BEGIN SOLUTION` and
`### END SOLUTION` (nbgrader's markers) becomes a `# YOUR CODE HERE` line saying what to write
and a NotImplementedError saying so (`stub_for`) in the exercise; `### BEGIN HIDDEN TESTS` ...
`### END HIDDEN TESTS` blocks are removed. A markdown cell tagged `solution` (a worked
derivation) becomes ANSWER_PROMPT in the exercise. Cells tagged `check` hold the self-checks that
must pass on the solution and fail on the stub (tests/test_exercises.py runs both).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

from tfcourse.files import write_atomic

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")


def stub_for(function: str | None) -> tuple[str, ...]:
    """The lines that replace a solution: what to write, and an error saying so if run."""
    what = f"the body of {function}" if function else "this part"
    return ("# YOUR CODE HERE: " + (f"write {what} (the exercise above says what it returns)"
                                    if function else "write the code the exercise asks for"),
            f'raise NotImplementedError("exercise: write {what}, then run the check cell '
            f'below it")')
CHECK_TAG = "check"
SOLUTION_TAG = "solution"
ANSWER_PROMPT = "*Your derivation here.*"


def _replace_blocks(source: str, begin: str, end: str, stub, where: str) -> str:
    """Replace every begin..end block (markers included) by stub lines at the marker's indent;
    `stub`: the lines, or a function of the name of the enclosing `def` (None outside one)."""
    out: list[str] = []
    inside, function = False, None
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("def ") and not inside:
            function = stripped[4:].split("(", 1)[0]
        if stripped == begin:
            if inside:
                raise ValueError(f"{where}, line {number}: {begin!r} inside another block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            lines = stub(function if indent else None) if callable(stub) else stub
            out.extend(indent + s for s in lines)
        elif stripped == end:
            if not inside:
                raise ValueError(f"{where}, line {number}: {end!r} without {begin!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {begin!r} is never closed by {end!r}")
    return "\n".join(out)


def exercise_source(source: str, where: str = "cell") -> str:
    """The exercise version of one code cell's source."""
    source = _replace_blocks(source, BEGIN_SOLUTION, END_SOLUTION, stub_for, where)
    return _replace_blocks(source, BEGIN_HIDDEN, END_HIDDEN, (), where)


def make_exercise(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """Exercise notebook from a solution notebook: stubs in place of solutions, no outputs."""
    exercise = nbformat.v4.new_notebook(metadata=copy.deepcopy(solution.metadata))
    for index, cell in enumerate(solution.cells):
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(
                exercise_source(cell.source, f"{name}, cell {index}"),
                metadata=copy.deepcopy(cell.metadata),
            )
        elif cell.cell_type == "markdown":
            answer = SOLUTION_TAG in cell.metadata.get("tags", [])
            new = nbformat.v4.new_markdown_cell(ANSWER_PROMPT if answer else cell.source,
                                                metadata=copy.deepcopy(cell.metadata))
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=copy.deepcopy(cell.metadata))
        new.metadata.pop("execution", None)
        if "id" in cell:
            new.id = cell.id
        exercise.cells.append(new)
    return exercise


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The notebook as committed: nbformat's JSON with one trailing newline."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def generate_exercises(solutions: Path, exercises: Path, check_only: bool = False) -> list[Path]:
    """Write (or with `check_only`, compare) exercises/NN.ipynb for every solutions/NN.ipynb.

    Returns the exercise files that were out of date (or, when writing, rewritten).
    Stale exercise notebooks without a solution count as out of date too.
    """
    stale = []
    expected_names = set()
    for solution_path in sorted(solutions.glob("*.ipynb")):
        target = exercises / solution_path.name
        expected_names.add(target.name)
        solution = nbformat.read(solution_path, as_version=4)
        text = notebook_text(make_exercise(solution, solution_path.name))
        if not target.is_file() or target.read_text() != text:
            stale.append(target)
            if not check_only:
                exercises.mkdir(parents=True, exist_ok=True)
                write_atomic(target, text.encode())
    for orphan in sorted(exercises.glob("*.ipynb")):
        if orphan.name not in expected_names:
            stale.append(orphan)
            if not check_only:
                orphan.unlink()
    return stale


def execute_notebook(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel of this Python, in its own folder.

    Timing metadata is not recorded, so re-executing changes only what really changed.
    """
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.course.nbtools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="generate exercises/ from solutions/")
    ex.add_argument("--solutions", type=Path, default=Path("solutions"))
    ex.add_argument("--exercises", type=Path, default=Path("exercises"))
    ex.add_argument("--check", action="store_true", help="only report; exit 1 if out of date")
    run = sub.add_parser("execute", help="re-execute notebooks in place and store their outputs")
    run.add_argument("paths", nargs="+", type=Path)
    run.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)

    if args.command == "exercises":
        stale = generate_exercises(args.solutions, args.exercises, check_only=args.check)
        verb = "out of date" if args.check else "written"
        for path in stale:
            print(f"{verb}: {path}")
        if args.check and stale:
            print("run `make exercises` to regenerate them", file=sys.stderr)
            return 1
        return 0
    for path in args.paths:
        print(f"executing {path} ...", flush=True)
        nb = execute_notebook(path, timeout=args.timeout)
        write_atomic(path, notebook_text(nb).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
