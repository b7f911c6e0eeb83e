"""Running a notebook twice gives the same outputs: seeds, not luck.

nbval already compares every notebook with its committed execution; this test makes the
claim explicit for chapter 4 (training runs: the most likely place for hidden randomness) by
executing it twice in fresh kernels and diffing every compared output."""

import re

import pytest
from conftest import REPO_ROOT

from tfcourse.course.nbtools import execute_notebook

MEASURED = re.compile(r"~-?\d+(\.\d+)?(e[-+]?\d+)?")  # same convention as nbval_sanitize.cfg


def compared_outputs(nb) -> list[list[str]]:
    """Per code cell, its text outputs as nbval compares them (ignored cells left out)."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "NBVAL_IGNORE_OUTPUT" in cell.source:
            continue
        texts, stream = [], ""
        for output in cell.outputs:
            if output.output_type == "stream":
                # one print can arrive as several stream messages (how the kernel flushes
                # under load): compare the text, not its chunking
                stream += output.text
                continue
            if stream:
                texts.append(MEASURED.sub("~MEASURED", stream))
                stream = ""
            if "text/plain" in output.get("data", {}):
                texts.append(output["data"]["text/plain"])
        if stream:
            texts.append(MEASURED.sub("~MEASURED", stream))
        cells.append(texts)
    return cells


@pytest.mark.slow
def test_chapter_4_notebook_twice_gives_identical_outputs():
    path = REPO_ROOT / "notebooks" / "04_transformer.ipynb"
    first = compared_outputs(execute_notebook(path))
    second = compared_outputs(execute_notebook(path))
    assert first == second
    assert sum(len(texts) for texts in first) > 10  # it did produce outputs to compare
