"""The exercise self-checks must pass right answers and explain wrong ones."""

import numpy as np
import pytest

from tfcourse.course import check


def test_check_close_passes_and_prints(capsys):
    check.check_close("x", np.array([1.0, 2.0]), [1.0, 2.0 + 1e-12])
    assert capsys.readouterr().out == "\u2713 x matches\n"


def test_check_close_reports_shape_mismatch():
    with pytest.raises(AssertionError, match=r"expected shape \(3,\), got array of shape \(2,\)"):
        check.check_close("x", np.zeros(2), np.zeros(3))


def test_check_close_reports_worst_value():
    with pytest.raises(AssertionError, match=r"1 of 3 values differ; at index \(1,\) expected 2"):
        check.check_close("x", [1.0, 5.0, 3.0], [1.0, 2.0, 3.0])


def test_check_close_reports_nan_and_none():
    with pytest.raises(AssertionError, match="non-finite"):
        check.check_close("x", [np.nan], [1.0])
    with pytest.raises(AssertionError, match="got None"):
        check.check_close("x", None, [1.0])


def test_check_function_names_the_failing_case(capsys):
    def wrong(x):
        return 2 * x if x < 5 else x

    with pytest.raises(AssertionError, match="in case 1"):
        check.check_function("double", wrong, lambda x: 2 * x, [(1,), (9,)])
    check.check_function("double", lambda x: x + x, lambda x: 2 * x, [(1,), (9,)])
    assert "2 cases match" in capsys.readouterr().out


def test_check_function_propagates_not_implemented():
    def stub(x):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check.check_function("stub", stub, lambda x: x, [(1,)])


def test_check_true():
    with pytest.raises(AssertionError, match="must hold"):
        check.check_true("p", False, "must hold")


def test_a_hint_follows_the_failure_and_is_optional(capsys):
    with pytest.raises(AssertionError, match=r"values differ.*\n  hint: how many steps\?"):
        check.check_close("x", [1.0], [2.0], hint="how many steps?")
    with pytest.raises(AssertionError, match=r"in case 0.*\n  hint: sum or mean\?"):
        check.check_function("f", lambda x: x, lambda x: 2 * x, [(1.0,)], hint="sum or mean?")
    with pytest.raises(AssertionError, match=r"must hold\n  hint: ties\?"):
        check.check_true("p", False, "must hold", hint="ties?")
    with pytest.raises(AssertionError) as err:
        check.check_close("x", [1.0], [2.0])
    assert "hint" not in str(err.value)
    check.check_close("x", [1.0], [1.0], hint="unused")
    assert capsys.readouterr().out == "\u2713 x matches\n"
