"""Budgets checked before anything runs (``check_budget_value``): the Python API and the
command line refuse the same budgets with the same words."""

from __future__ import annotations

import pytest

from remat.bench.configurations import check_budget
from remat.solver.budget import check_budget_value, parse_budget, percent_meant


@pytest.mark.parametrize(
    ("budget", "meant"),
    [(40, "40%"), ("40", "40%"), (0.5, "50%"), ("0.5", "50%"), (100, "100%"), (" 7.5 ", "7.5%")],
)
def test_a_bare_number_up_to_100_is_a_percentage_by_intent(budget, meant):
    assert percent_meant(budget) == meant
    with pytest.raises(ValueError, match=f"did you mean {meant}\\?") as err:
        check_budget_value(budget, "remat.autoplan: budget")
    assert str(err.value).startswith(f"remat.autoplan: budget {budget}: ")
    with pytest.raises(ValueError, match=f"did you mean {meant}\\?"):
        check_budget(str(budget), "--budget")


@pytest.mark.parametrize("budget", [101, "101", "40%", "0.5%", "6GiB", "300MB", 10**9, 2.5e6])
def test_budgets_that_can_be_meant_pass(budget):
    assert percent_meant(budget) is None
    check_budget_value(budget, "remat.autoplan: budget")


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        ("abc", ValueError, r"^remat.autoplan: budget 'abc' does not parse"),
        ("-5", ValueError, r"^remat.autoplan: budget '-5' does not parse"),
        (0, ValueError, r"^remat.autoplan: budget must be a positive number of bytes, got 0$"),
        (-300, ValueError, r"^remat.autoplan: budget must be a positive number of bytes"),
        ("0%", ValueError, r"^remat.autoplan: budget '0%' is 0 bytes"),
        ("1e999", ValueError, r"^remat.autoplan: budget '1e999' is not a finite number"),
        ("40 parsecs", ValueError, r"unknown unit 'parsecs'"),
        (None, TypeError, r"^remat.autoplan: budget must be bytes .* got NoneType None$"),
        (True, TypeError, r"got bool True$"),
        ([40], TypeError, r"got list \[40\]$"),
    ],
)
def test_budgets_that_cannot_be_meant_name_the_caller_and_the_value(budget, error, match):
    with pytest.raises(error, match=match):
        check_budget_value(budget, "remat.autoplan: budget")


def test_the_command_line_says_the_same_as_the_python_api():
    for budget in ("40", "abc", "0%", "1e999"):
        with pytest.raises(ValueError) as python:
            check_budget_value(budget, "--budget")
        with pytest.raises(ValueError) as cli:
            check_budget(budget, "--budget")
        assert str(cli.value) == str(python.value)
    with pytest.raises(ValueError, match="--budget needs a budget"):
        check_budget("", "--budget")


def test_parse_budget_names_the_budget_as_told():
    with pytest.raises(ValueError, match="^--budget 'x' does not parse"):
        parse_budget("x", name="--budget")
    with pytest.raises(ValueError, match="^budget 'x' does not parse"):
        parse_budget("x")
