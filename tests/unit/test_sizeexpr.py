"""Size expressions: zram-generator arithmetic evaluated without eval."""

from __future__ import annotations

import pytest

from zramd.sizeexpr import MAX_DEPTH, SizeExprError, evaluate, evaluate_mib


@pytest.mark.parametrize(
    ("expr", "ram", "want"),
    [
        ("min(ram / 2, 4096)", 16000, 4096),
        ("min(ram / 2, 4096)", 2000, 1000),
        ("ram", 1234, 1234),
        ("4096", 0, 4096),
        ("1 + 2 * 3", 0, 7),
        ("(1 + 2) * 3", 0, 9),
        ("10 - 4 - 3", 0, 3),
        ("100 / 10 / 2", 0, 5),
        ("17 % 5", 0, 2),
        ("-3 + 5", 0, 2),
        ("--3", 0, 3),
        ("+ram", 8, 8),
        ("max(ram * 0.25, 512, 100)", 1000, 512),
        ("min(max(ram, 1), 2)", 5, 2),
        ("1.5e3", 0, 1500),
        (".5 * 4", 0, 2),
        ("  ram  /  4  ", 8192, 2048),
        ("ram / 3", 10, 10 / 3),
    ],
)
def test_good(expr: str, ram: float, want: float) -> None:
    assert evaluate_mib(expr, ram) == pytest.approx(want)


@pytest.mark.parametrize(
    ("expr", "reason", "col"),
    [
        ("", "empty expression", 1),
        ("   ", "empty expression", 1),
        ("ram +", "unexpected end of expression", 6),
        ("foo * 2", "unknown name 'foo'", 1),
        ("1 / 0", "division by zero", 3),
        ("5 % 0", "division by zero", 3),
        ("(1 + 2", "expected ')'", 7),
        ("2 ** 3", "unexpected '*'", 4),
        ("1 $ 2", "unexpected character '$'", 3),
        ("min 3", "expected '('", 5),
        ("ram(1)", "is not a function", 1),
        ("1 2", "unexpected '2'", 3),
        ("min()", "unexpected ')'", 5),
        ("__import__(1)", "unknown name '__import__'", 1),
        ("__import__('os')", "unexpected character", 12),
        ("1,2", "unexpected ','", 2),
    ],
)
def test_errors(expr: str, reason: str, col: int) -> None:
    with pytest.raises(SizeExprError) as ei:
        evaluate_mib(expr, 1024)
    assert reason in str(ei.value)
    assert ei.value.pos + 1 == col
    assert f"column {col}" in str(ei.value)


def test_depth_limit() -> None:
    with pytest.raises(SizeExprError, match="nested deeper"):
        evaluate("(" * (MAX_DEPTH + 5) + "1" + ")" * (MAX_DEPTH + 5))
    with pytest.raises(SizeExprError, match="nested deeper"):
        evaluate("-" * (MAX_DEPTH + 5) + "1")
    assert evaluate("(" * 10 + "1" + ")" * 10) == 1


def test_length_limit() -> None:
    with pytest.raises(SizeExprError, match="longer than"):
        evaluate("1+" * 1000 + "1")


def test_overflow_is_error() -> None:
    with pytest.raises(SizeExprError, match="finite"):
        evaluate("1e308 * 10")
