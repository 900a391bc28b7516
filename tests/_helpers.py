"""Shared test helpers: devices for the kernels, engine cases, per-dtype tolerances, relative error, scripts.

Imported by the test modules as ``from _helpers import ...`` (not from
``conftest``: the benchmark suite has a conftest of its own, and with both
directories collected in one run the name ``conftest`` is ambiguous).
tests/conftest.py has already set ``TRITON_INTERPRET`` when this is imported.
"""

import importlib.util
import os
import re
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_devices():
    """Devices on which the Triton kernels can run in this process."""
    if not HAS_TRITON:
        return []
    if INTERPRETING:
        return ["cpu"]
    return ["cuda"] if HAS_CUDA else []


# The engines a test can run dynrank's ops on here: torch always, Triton where its kernels run.
BACKENDS = ["torch"] + (["triton"] if kernel_devices() else [])


def engine_cases(cases):
    """(engine, *case) for every engine of :data:`BACKENDS`, less the full form (a case's first item) on
    Triton: that form always runs F.linear, so a 'triton' case of it would repeat the torch case."""
    return [(engine, *case) for engine in BACKENDS for case in cases if not (engine == "triton" and case[0] == "full")]


# Per-dtype tolerances on relative error (Frobenius norm of the difference over
# the norm of the float64 reference).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rel_err(actual, expected):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def load_script(relative_path, module_name):
    """Import a script of the checkout (e.g. ``benchmarks/report.py``) as a module."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bad_outs(tmp_path, name):
    """The two kinds of ``--out`` that ``prepare_out`` refuses, each with its message: "under a file" (the
    path ``a-file/<name>`` where ``a-file`` is a file) and "folder" (an existing folder)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"under a file": (blocker / name, f"{blocker} is a file, not a folder"),
            "folder": (tmp_path, "is a folder, expected a file to write")}


def assert_out_refused_before_work(script, work, argv, out, message, monkeypatch, capsys):
    """``script.main(argv + ["--out", out])`` exits 2 with ``error: --out <out>: <message>`` before its
    ``work`` function (monkeypatched to fail if called) runs."""
    import pytest

    def no_work(*args, **kwargs):
        raise AssertionError(f"{work} ran before --out was checked")
    monkeypatch.setattr(script, work, no_work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"error: --out {out}: {message}\n" in capsys.readouterr().err


def assert_grad_write_refused_then_merged(op, merge, weight, expected):
    """``merge()`` (``op`` writing ``weight``, which requires grad, in place) raises the in-place error with
    grad mode on and writes nothing; under ``torch.no_grad()`` it returns ``weight`` merged to ``expected``."""
    _assert_write_refused_then_merged(merge, weight, expected, torch.no_grad(),
                                      f"{op} writes weight in place, which autograd cannot record, got a weight "
                                      f"that requires grad with grad mode on; call it under torch.no_grad()")


def assert_inference_write_refused_then_merged(op, merge, weight, expected):
    """``merge()`` (``op`` writing ``weight``, an inference tensor, in place) raises outside
    ``torch.inference_mode()``, as torch's in-place ops do, and writes nothing; inside it returns ``weight``
    merged to ``expected``."""
    assert weight.is_inference()
    _assert_write_refused_then_merged(merge, weight, expected, torch.inference_mode(),
                                      f"{op} writes weight in place, got an inference tensor (made under "
                                      f"torch.inference_mode()) outside inference mode")


def _assert_write_refused_then_merged(merge, weight, expected, context, message):
    """``merge()`` raises a RuntimeError with ``message`` and writes nothing to ``weight``; inside ``context``
    it returns ``weight`` merged to ``expected``."""
    import re

    import pytest
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        merge()
    assert torch.equal(weight.detach(), before)
    with context:
        assert merge() is weight
    assert rel_err(weight, expected) < REL_TOL[torch.float32]


def assert_aliased_operand_refused(op, merge, reference, weight, operands, name):
    """``merge(weight, *operands, 0.5)`` (``op`` writing ``weight`` in place) refuses operand ``name``, which lies
    in ``weight``'s memory, naming it, and writes nothing; the same values as separate tensors merge to
    ``reference(weight, *operands, 0.5)``."""
    import re

    import pytest
    shape, before = tuple(operands[name].shape), weight.clone()
    with pytest.raises(ValueError, match=re.escape(f"{op} writes weight while it reads {name}, so they must not "
                                                   f"share memory, got {name} {shape} in memory that weight "
                                                   f"{tuple(weight.shape)} spans (pass {name}.clone())")):
        merge(weight, *operands.values(), 0.5)
    assert torch.equal(weight, before)
    expected = reference(weight, *operands.values(), 0.5)
    assert rel_err(weight, expected) > 0.1                  # a merge that wrote nothing would show
    merge(weight, *(t.clone() for t in operands.values()), 0.5)
    assert rel_err(weight, expected) < REL_TOL[weight.dtype]


def holding_optimizer(inner, attribute="optimizer"):
    """A torch Optimizer that holds ``inner``, the one it steps, as ``attribute`` and shows its groups and
    state: ``"optimizer"`` as Accelerate's AcceleratedOptimizer, ``"optim"`` as torch's PostLocalSGDOptimizer."""

    class Holding(torch.optim.Optimizer):
        def __init__(self):
            setattr(self, attribute, inner)

        param_groups = property(lambda self: inner.param_groups)
        state = property(lambda self: inner.state)
        defaults = property(lambda self: inner.defaults)

        def step(self, closure=None):
            return inner.step(closure)

        def zero_grad(self, set_to_none=True):
            inner.zero_grad(set_to_none)

    return Holding()


class Wrapper(torch.nn.Module):
    """A module around ``inner`` that only calls it (as activation checkpointing or a compiled submodule
    wraps a block): the layers inside get new names, ``inner.`` in front."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def assert_lbfgs_step_like_the_reference(layer, forward, reference_forward, target, moves):
    """One torch.optim.LBFGS step on ``layer``'s trainable parameters and one on float64 copies of them
    (``reference_forward(copies)``, a dict name → tensor) give the same parameters, each moved by more
    than ``moves`` (relative).  L-BFGS views every gradient flat, so a factor of odd strides fails it."""
    trained = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    reference = {n: p.detach().clone().requires_grad_() for n, p in trained.items()}

    def lbfgs_step(params, run):
        opt = torch.optim.LBFGS(params, lr=0.5, max_iter=3, history_size=4)

        def closure():
            opt.zero_grad()
            loss = (run() - target).square().mean()
            loss.backward()
            return loss
        opt.step(closure)

    lbfgs_step(list(trained.values()), forward)
    lbfgs_step(list(reference.values()), lambda: reference_forward(reference))
    for name, p in trained.items():
        assert rel_err(p, before[name]) > moves, f"the step must move {name}"
        assert rel_err(p, reference[name]) < REL_TOL[torch.float64], name


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks():
    """The README's ```python blocks."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def readme_block(marker):
    """The README's one ```python block holding ``marker``."""
    found = [code for code in readme_blocks() if marker in code]
    assert len(found) == 1, f"expected one README block containing {marker!r}, found {len(found)}"
    return found[0]
