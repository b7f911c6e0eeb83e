"""Exercise generation from solution notebooks (nbgrader-style markers)."""

import nbformat
import pytest

from tfcourse.course.nbtools import (
    ANSWER_PROMPT,
    exercise_source,
    generate_exercises,
    make_exercise,
    notebook_text,
)


def test_solution_block_becomes_indented_stub():
    source = (
        "def f(x):\n"
        "    ### BEGIN SOLUTION\n"
        "    y = x * 2\n"
        "    return y\n"
        "    ### END SOLUTION\n"
        "print('after')"
    )
    assert exercise_source(source) == (
        "def f(x):\n"
        "    # YOUR CODE HERE: write the body of f (the exercise above says what it returns)\n"
        '    raise NotImplementedError("exercise: write the body of f, then run the check '
        'cell below it")\n'
        "print('after')"
    )
    top_level = exercise_source("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION")
    assert top_level.startswith("# YOUR CODE HERE: write the code the exercise asks for")


def test_hidden_tests_are_removed_and_visible_code_kept():
    source = "check(f)\n### BEGIN HIDDEN TESTS\nassert f(1) == 2\n### END HIDDEN TESTS\nx = 1"
    assert exercise_source(source) == "check(f)\nx = 1"


@pytest.mark.parametrize(
    "source, match",
    [
        ("### BEGIN SOLUTION\nx = 1", "never closed"),
        ("x = 1\n### END SOLUTION", "without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
    ],
)
def test_unbalanced_markers_are_errors_with_location(source, match):
    with pytest.raises(ValueError, match=match):
        exercise_source(source, "nb.ipynb, cell 3")


def _solution_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell(
            "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
        ),
        nbformat.v4.new_code_cell("check(f)", metadata={"tags": ["check"]}),
    ]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    nb.cells[1].execution_count = 1
    return nb


def test_make_exercise_strips_outputs_keeps_tags_and_markdown():
    exercise = make_exercise(_solution_notebook())
    assert exercise.cells[0].source == "# Title"
    assert "raise NotImplementedError(" in exercise.cells[1].source
    assert "return 1" not in exercise.cells[1].source
    assert exercise.cells[1].outputs == [] and exercise.cells[1].execution_count is None
    assert exercise.cells[2].metadata["tags"] == ["check"]


def test_a_worked_derivation_is_replaced_by_an_answer_prompt():
    solution = _solution_notebook()
    solution.cells.append(nbformat.v4.new_markdown_cell("16 = 2 + 2 + 4 + 4 + 4",
                                                        metadata={"tags": ["solution"]}))
    exercise = make_exercise(solution)
    assert exercise.cells[-1].source == ANSWER_PROMPT
    assert "2 + 2" not in "".join(cell.source for cell in exercise.cells)
    assert exercise.cells[0].source == "# Title"  # untagged markdown is kept


def test_generate_writes_then_reports_in_sync(tmp_path):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    nbformat.write(_solution_notebook(), solutions / "00_x.ipynb")
    assert generate_exercises(solutions, exercises, check_only=True) == [exercises / "00_x.ipynb"]
    generate_exercises(solutions, exercises)
    assert generate_exercises(solutions, exercises, check_only=True) == []
    (exercises / "99_orphan.ipynb").write_text(notebook_text(nbformat.v4.new_notebook()))
    assert generate_exercises(solutions, exercises, check_only=True) == [
        exercises / "99_orphan.ipynb"
    ]
