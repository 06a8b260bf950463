"""Where the tests find what they need from outside the repository, and what happens when it is missing.

``../shared/data/minicoco`` (a real 40-image COCO subset) is found relative to the repository, wherever the
clone lives. A test that needs a resource calls :func:`require`: on a user's machine a missing resource skips
the test with a visible reason; under CI (``CI`` set to anything but ``""``/``0``/``false``) it fails, so a
required check can never pass by being skipped. Optional dependencies (torch, tensorflow-datasets) follow
the same rule through :func:`import_or_skip`.
"""
from __future__ import annotations

import importlib
import os
import types

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # the helpers (train_fixtures.py, ...) live here
ROOT = os.path.dirname(TESTS_DIR)  # the repository
MINICOCO = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "minicoco"))


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(available: bool, what: str) -> None:
    """Skip (a user's machine) or fail (CI) the calling test, or the module being collected, when ``available``
    is False."""
    if available:
        return
    if under_ci():
        pytest.fail(f"{what} is missing, and CI requires it (this test would otherwise be skipped)")
    pytest.skip(f"{what} is missing", allow_module_level=True)


def minicoco_available() -> bool:
    return os.path.isdir(os.path.join(MINICOCO, "images")) and os.path.isfile(
        os.path.join(MINICOCO, "annotations_val.json"))


def minicoco() -> str:
    """The minicoco folder (``images/``, ``annotations_{train,val}.json``), or skip / fail (see :func:`require`)."""
    require(minicoco_available(), f"the minicoco data ({MINICOCO})")
    return MINICOCO


def import_or_skip(name: str, extra: str) -> types.ModuleType:
    """``importlib.import_module(name)``, or skip / fail the test (see :func:`require`) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, f"the {name} package (pip install -e '.[{extra}]')")
        raise  # not reached: require skipped or failed
