"""Friendly self-checks for the exercises.

A check prints one line starting with a tick when the learner's answer is right, and raises
an AssertionError that says what was expected and what was found when it is not. Outputs
are short and deterministic so that solution notebooks pass nbval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

PASS = "\u2713"  # check mark
FAIL = "\u2717"  # ballot x


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape}, dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _with_hint(message: str, hint: str) -> str:
    """`message` followed by an indented 'hint:' line when there is a hint."""
    return f"{message}\n  hint: {hint}" if hint else message


def check_close(
    name: str, actual, expected, rtol: float = 1e-6, atol: float = 1e-9, quiet: bool = False,
    hint: str = "",
) -> None:
    """Assert `actual` equals `expected` element-wise within tolerance, explaining any gap.

    Prints '<tick> name matches' on success unless `quiet`. On failure, `hint` (the likely
    cause, without the answer) is added to the message.
    """
    try:
        _check_close(name, actual, expected, rtol, atol)
    except AssertionError as err:
        raise AssertionError(_with_hint(str(err), hint)) from None
    if not quiet:
        print(f"{PASS} {name} matches")


def _check_close(name: str, actual, expected, rtol: float, atol: float) -> None:
    if actual is None:
        raise AssertionError(f"{FAIL} {name}: got None - did you forget to return the result?")
    actual_arr = np.asarray(actual)
    expected_arr = np.asarray(expected)
    if actual_arr.shape != expected_arr.shape:
        raise AssertionError(
            f"{FAIL} {name}: expected shape {expected_arr.shape}, got {_describe(actual)}"
        )
    if not np.all(np.isfinite(actual_arr)) and np.all(np.isfinite(expected_arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(actual_arr))[0])
        raise AssertionError(
            f"{FAIL} {name}: non-finite value {actual_arr[bad]} at index {bad} "
            f"(expected {expected_arr[bad]:.6g})"
        )
    close = np.isclose(actual_arr, expected_arr, rtol=rtol, atol=atol)
    if not np.all(close):
        worst = np.unravel_index(
            np.argmax(np.abs(actual_arr - expected_arr) * ~close), actual_arr.shape
        )
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{FAIL} {name}: {int((~close).sum())} of {close.size} values differ; "
            f"at index {worst} expected {float(expected_arr[worst]):.6g}, "
            f"got {float(actual_arr[worst]):.6g}"
        )


def check_function(
    name: str,
    candidate: Callable,
    reference: Callable,
    cases: Iterable[Sequence],
    rtol: float = 1e-6,
    atol: float = 1e-9,
    hint: str = "",
) -> None:
    """Call `candidate(*case)` and `reference(*case)` for every case and compare them.

    Prints '<tick> name: N cases match the reference' when all agree; `hint` as in check_close.
    """
    cases = list(cases)
    for i, case in enumerate(cases):
        expected = reference(*case)
        actual = candidate(*case)
        try:
            check_close(name, actual, expected, rtol=rtol, atol=atol, quiet=True)
        except AssertionError as err:
            shapes = ", ".join(_describe(arg) for arg in case)
            raise AssertionError(_with_hint(f"{err}\n  in case {i} with arguments: {shapes}",
                                            hint)) from None
    print(f"{PASS} {name}: {len(cases)} cases match the reference")


def check_true(name: str, condition: bool, explanation: str, hint: str = "") -> None:
    """Assert a property; `explanation` says what should hold (`hint`: as in check_close)."""
    if not condition:
        raise AssertionError(_with_hint(f"{FAIL} {name}: {explanation}", hint))
    print(f"{PASS} {name}: {explanation}")
