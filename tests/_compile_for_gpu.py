"""Compile the Triton GEMM engine ahead of time for an NVIDIA target, no GPU needed.

Run as a script in a process where Triton's interpreter is off (the test suite
enables it).  Triton lowers the kernel to PTX and assembles it with the ptxas it
ships, so compile errors that the interpreter cannot see — unsupported ops,
dtype mismatches in ``tl.dot``, shared-memory overflow of a config — surface on
a CPU-only machine.  Prints one line per variant; exits non-zero on the first
failure.

Usage: python tests/_compile_for_gpu.py [capability ...]   (default: 90)
"""

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dynrank.kernels.lowrank_gemm import _lowrank_gemm_kernel, _native_config

POINTERS = ("x_ptr", "wt_ptr", "u_ptr", "vt_ptr", "bias_ptr", "out_ptr")
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# (HAS_X, HAS_U, HAS_BIAS, ACCUMULATE): adapter forward/dx, low-rank chain, x·B, merge.
ROLES = [(True, True, True, False), (False, True, True, False), (True, False, False, False),
         (False, True, False, True)]
# (M, N) problem sizes that select each tile config of _native_config.
SIZES = [(4096, 4096), (512, 512), (8192, 16), (16, 4096)]


def compile_variant(capability, dtype, role, size):
    import torch
    has_x, has_u, has_bias, accumulate = role
    config = _native_config(*size, getattr(torch, TORCH_NAMES[dtype]), accumulate)
    params = list(inspect.signature(_lowrank_gemm_kernel.fn).parameters)
    constexprs = dict(HAS_X=has_x, HAS_U=has_u, HAS_BIAS=has_bias, ACCUMULATE=accumulate, DOT_FP32=False,
                      INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                      **{k: v for k, v in config.items() if k.isupper()})
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + dtype
        elif name in ("alpha", "beta"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    source = ASTSource(fn=_lowrank_gemm_kernel, signature=signature, constexprs=constexprs)
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def main(argv):
    capabilities = [int(a) for a in argv] or [90]
    for capability in capabilities:
        for dtype in ("bf16", "fp16", "fp32"):
            for role in ROLES:
                for size in SIZES:
                    kernel = compile_variant(capability, dtype, role, size)
                    print(f"sm_{capability} {dtype} role={role} size={size} "
                          f"shared={kernel.metadata.shared} B ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
