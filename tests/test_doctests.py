"""Every ``>>>`` example in the library's docstrings runs and prints what it shows.

An example written with ``>>>`` is a promise to a reader who pastes it; fragments that need the
reader's own model or loop are written as plain code blocks (``::``) instead.  Kernel examples run
on CUDA, or in Triton's interpreter without it (``conftest.py`` switches it on).
"""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import dynrank
import dynrank.kernels

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# Modules that need an optional package (module name → package): left out where it is not installed.
OPTIONAL = {"dynrank.hf": "transformers", "dynrank.hf_inrank": "transformers"}


def _modules():
    names = {"dynrank", "dynrank.kernels"}
    for package in (dynrank, dynrank.kernels):
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                     if not info.name.endswith(".__main__"))
    return sorted(name for name in names
                  if name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name]) is not None)


def _examples(name):
    module = importlib.import_module(name)
    return [test for test in doctest.DocTestFinder().find(module, name) if test.examples]


MODULES = [name for name in _modules() if _examples(name)]


def test_the_library_has_examples_in_its_main_modules():
    for name in ("dynrank.linear", "dynrank.conv", "dynrank.scheduler", "dynrank.checkpoint", "dynrank.monitor",
                 "dynrank.cost", "dynrank.functional", "dynrank.kernels.conv_merge"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    if name == "dynrank.plots":
        pytest.importorskip("matplotlib", reason="the plotting examples need matplotlib (dynrank[plots])")
    monkeypatch.chdir(tmp_path)             # an example that writes files writes them here
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
