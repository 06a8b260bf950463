"""The rule for tests that need something from outside the repository: skip on a user's machine, fail under CI."""
import os

import pytest

import resources


def test_minicoco_is_found_relative_to_the_repository():
    assert resources.MINICOCO == os.path.normpath(os.path.join(resources.ROOT, "..", "shared", "data", "minicoco"))


@pytest.mark.parametrize("ci,outcome", [("", pytest.skip.Exception), ("false", pytest.skip.Exception),
                                         ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)])
def test_missing_resource_skips_or_fails(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no such thing is missing"):
        resources.require(False, "no such thing")
    resources.require(True, "something present")  # nothing happens


def test_missing_package(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="maskx_no_such_package"):
        resources.import_or_skip("maskx_no_such_package", "test")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        resources.import_or_skip("maskx_no_such_package", "test")
    assert resources.import_or_skip("json", "test").dumps([1]) == "[1]"
