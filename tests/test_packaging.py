"""setup.py's requirements: a literal list whose platform choices are markers, so that a wheel built on
one platform installs on the others (a test of the building machine's platform made a Linux-built wheel
require triton on macOS and Windows, where triton has no wheels)."""
import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def _install_requires():
    for node in ast.walk(ast.parse(SETUP.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "install_requires" for t in node.targets):
            return ast.literal_eval(node.value)     # ValueError where the list is computed at build time
    raise AssertionError("setup.py assigns no install_requires")


@pytest.mark.parametrize("platform, triton", [("linux", True), ("darwin", False), ("win32", False)])
def test_requirements_choose_triton_by_marker(platform, triton):
    names = {r.name for r in map(Requirement, _install_requires())
             if r.marker is None or r.marker.evaluate({"sys_platform": platform})}
    assert names == {"torch", "numpy", "tensorly"} | ({"triton"} if triton else set())
