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


def test_the_sdist_carries_every_file_the_test_suite_needs(tmp_path):
    """setuptools' default sdist took only tests/test*.py: the helpers and conftest.py the modules import
    stayed out (38 of them failed to import), and so did benchmarks/ and .ci/run.  Built from a copy of
    the tracked files, so no egg-info of the checkout's lists them instead."""
    import shutil
    import subprocess
    import sys
    import tarfile

    root = SETUP.parent
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    files = [name for name in tracked.stdout.split("\0") if name]
    source = tmp_path / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    build = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path), "--formats=gztar"],
                           cwd=source, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = [name for name in files if name.startswith(("tests/", "benchmarks/", ".ci/"))]
    missing = sorted(set(needed) - shipped)
    assert not missing, missing
