"""Show the code that runs: a package function's real source in a notebook, highlighted.

    from tfcourse.course.show import show
    show(attention.softmax)                  # the function the package calls, as it is now
    show("tfcourse.parallel.comm.ring_reduce_scatter")  # an MPI program's, without importing
                                             # it (importing would start MPI in the kernel)

What is shown is read from the object itself (inspect.getsource), so the page cannot drift
from the code: when the function changes, the notebook's stored output no longer matches and
nbval says so until the chapter is re-run.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from pathlib import Path

from IPython.display import Code, display


def _source_in_file(dotted: str) -> str:
    """The source of "package.module.function" (or ".Class.method") read from the module's
    file, which is found but never imported."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:cut]))
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            break
    else:
        raise ValueError(f"obj: no module of {dotted!r} found")
    text = Path(spec.origin).read_text()
    body = ast.parse(text).body
    for name in parts[cut:]:
        node = next((n for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef)
                     and n.name == name), None)
        if node is None:
            raise ValueError(f"obj: {'.'.join(parts[:cut])} defines no {name!r}")
        body = node.body
    lines = text.splitlines()[node.lineno - 1 - len(node.decorator_list):node.end_lineno]
    return textwrap.dedent("\n".join(lines)) + "\n"


def source(obj, start: str | None = None, end: str | None = None) -> str:
    """The source of a function, method or class (or of "module.name", read from the file
    without importing it); with `start`/`end`, only the lines from the first one containing
    `start` up to and including the first one after it containing `end` (to show the heart of
    a longer function)."""
    if isinstance(obj, str):
        text = _source_in_file(obj)
    elif inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj):
        text = inspect.getsource(obj)
    else:
        raise ValueError(f"obj: expected a function, method or class, got {obj!r}")
    if start is None and end is None:
        return text
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if start is None or start in line), None)
    if first is None:
        raise ValueError(f"start: {start!r} is not in the source of {obj!r}")
    last = len(lines) - 1 if end is None else next(
        (i for i in range(first, len(lines)) if end in lines[i]), None)
    if last is None:
        raise ValueError(f"end: {end!r} is not in {obj!r} after {start!r}")
    return textwrap.dedent("\n".join(lines[first:last + 1])) + "\n"


def show(*objects, start: str | None = None, end: str | None = None) -> None:
    """Display each object's source (see `source`) as highlighted Python."""
    for obj in objects:
        display(Code(source(obj, start, end), language="python"))
