"""Tests for the Deferred helpers of L{pullmail.testing}."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from pullmail.testing import assert_no_result, failure_of, result_of


def test_result_of_a_fired_deferred():
    assert result_of(defer.succeed(7)) == 7


def test_result_of_refuses_no_result_and_failure():
    with pytest.raises(AssertionError, match="no result"):
        result_of(defer.Deferred())
    with pytest.raises(AssertionError, match="failed"):
        result_of(defer.fail(ValueError("x")))


def test_failure_of_checks_the_type():
    assert failure_of(defer.fail(ValueError("x")), ValueError).check(ValueError)
    with pytest.raises(AssertionError, match="not"):
        failure_of(defer.fail(ValueError("x")), KeyError)
    with pytest.raises(AssertionError, match="succeeded"):
        failure_of(defer.succeed(1))


def test_assert_no_result():
    d = defer.Deferred()
    assert_no_result(d)
    d.callback(3)
    assert result_of(d) == 3
    with pytest.raises(AssertionError, match="already"):
        assert_no_result(defer.succeed(1))
