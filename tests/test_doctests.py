"""Every docstring example of the package runs and prints what it shows (the examples are documentation: one
that raises, or shows another result, misleads its reader)."""
from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import torchrl_dreammpc

MODULES = sorted(info.name for info in pkgutil.walk_packages(torchrl_dreammpc.__path__, "torchrl_dreammpc."))
#: Modules whose examples render with MuJoCo: skipped where it has no offscreen GL backend (conftest's ``gl``).
RENDERING = {"torchrl_dreammpc.envs._base"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, one_thread, request):
    if name in RENDERING:
        request.getfixturevalue("gl")
    module = importlib.import_module(name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [test for test in doctest.DocTestFinder().find(module, name) if test.examples]
    for test in tests:
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()[-4000:]
