"""Compile the Triton GEMM engine ahead of time for an NVIDIA target, no GPU needed.

Run as a script in a process where Triton's interpreter is off (the test suite
enables it).  Triton lowers the kernel to PTX and assembles it with the ptxas it
ships, so compile errors that the interpreter cannot see — unsupported ops,
dtype mismatches in ``tl.dot``, shared-memory overflow of a config — surface on
a CPU-only machine.  Prints one line per variant; exits non-zero on the first
failure.

With the ptxas Triton ships, each line also reports the registers per thread
and the bytes spilled to local memory (``regs=255 spills=884`` is a kernel that
runs out of registers).

Usage: python tests/_compile_for_gpu.py [capability ...]   (default: 90)
"""

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dynrank.kernels.lowrank_gemm import _lowrank_gemm_kernel, _native_config

POINTERS = ("x_ptr", "wt_ptr", "u_ptr", "vt_ptr", "bias_ptr", "out_ptr")
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Each role: (HAS_X, HAS_U, HAS_BIAS, ACCUMULATE) and the strides that are 1 when
# lowrank_linear.py and merge.py launch it on contiguous tensors (x, W_f (N, K), A (N, R),
# B (K, R), out).  At run time Triton makes an int argument equal to 1 a constant and marks
# pointers and ints that are multiples of 16 as such; the compile here does the same (with
# every other size and stride a multiple of 16, as on the target shapes), so the tile loads,
# the software pipeline and the register use are those of a real launch.
ROLES = {
    "adapter forward": ((True, True, True, False), ("stride_xk", "stride_wk", "stride_ur", "stride_vr", "stride_on")),
    "adapter dx": ((True, True, False, False), ("stride_xk", "stride_wn", "stride_ur", "stride_vr", "stride_on")),
    "lowrank chain": ((False, True, True, False), ("stride_ur", "stride_vr", "stride_on")),
    "x·B": ((True, False, False, False), ("stride_xk", "stride_wn", "stride_on")),
    "merge": ((False, True, False, True), ("stride_ur", "stride_vr", "stride_on")),
}
# (M, N) problem sizes that select each tile config of _native_config.
SIZES = [(4096, 4096), (512, 512), (8192, 16), (16, 4096)]


def compile_variant(capability, dtype, role, size, index_64=False):
    import torch
    (has_x, has_u, has_bias, accumulate), unit_strides = ROLES[role]
    config = _native_config(*size, getattr(torch, TORCH_NAMES[dtype]), accumulate, 16 if accumulate else 0)
    params = list(inspect.signature(_lowrank_gemm_kernel.fn).parameters)
    constexprs = dict(HAS_X=has_x, HAS_U=has_u, HAS_BIAS=has_bias, ACCUMULATE=accumulate, DOT_FP32=False,
                      INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", INDEX_64=index_64,
                      **{k: v for k, v in config.items() if k.isupper()})
    constexprs.update({name: 1 for name in unit_strides})
    signature, attrs = {}, {}
    for index, name in enumerate(params):
        if name not in constexprs and name not in ("alpha", "beta", "beta_over_alpha"):
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + dtype
        elif name in ("alpha", "beta", "beta_over_alpha"):
            signature[name] = "fp32"
        else:
            # Triton types an int argument by its value: strides are i64 only on huge tensors.
            signature[name] = "i64" if index_64 and name.startswith("stride") else "i32"
    source = ASTSource(fn=_lowrank_gemm_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


# The experimental TMA engine (kernels/lowrank_gemm_tma.py): W_T / V_T of its two adapter roles.
TMA_ROLES = {"adapter forward": (True, True), "adapter dx": (False, True)}


def compile_tma_variant(capability, dtype, role, size):
    import torch

    from dynrank.kernels.lowrank_gemm_tma import _lowrank_gemm_tma_kernel
    w_t, v_t = TMA_ROLES[role]
    config = _native_config(*size, getattr(torch, TORCH_NAMES[dtype]), False)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    constexprs = dict(HAS_X=True, HAS_U=True, HAS_BIAS=True, W_T=w_t, V_T=v_t, DOT_FP32=False,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config["GROUP_M"], stride_on=1)
    blocks = {"x_desc": (bm, bk), "u_desc": (bm, bk), "w_desc": (bn, bk) if w_t else (bk, bn),
              "v_desc": (bn, bk) if v_t else (bk, bn)}
    signature, attrs = {}, {}
    for index, name in enumerate(inspect.signature(_lowrank_gemm_tma_kernel.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in blocks:
            signature[name] = f"tensordesc<{dtype}[{blocks[name][0]}, {blocks[name][1]}]>"
        elif name in ("alpha", "beta", "beta_over_alpha"):
            signature[name] = "fp32"
        else:
            signature[name] = "*" + dtype if name.endswith("_ptr") else "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=_lowrank_gemm_tma_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def register_use(kernel, capability):
    """(registers per thread, spill-store bytes) from ptxas -v on the kernel's PTX, or (None, None)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(capability).path
    except Exception:           # another Triton layout: the report is optional
        return None, None
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(kernel.asm["ptx"])
        proc = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def main(argv):
    capabilities = [int(a) for a in argv] or [90]
    variants = [(dtype, role, size, False) for dtype in ("bf16", "fp16", "fp32") for role in ROLES for size in SIZES]
    variants.append(("bf16", "adapter forward", SIZES[0], True))       # int64 indexing, for huge operands
    for capability in capabilities:
        for dtype, role, size, index_64 in variants:
            kernel = compile_variant(capability, dtype, role, size, index_64)
            regs, spills = register_use(kernel, capability)
            print(f"sm_{capability} {dtype} role={role!r} size={size} int64={index_64} "
                  f"shared={kernel.metadata.shared} B regs={regs} spills={spills} ok", flush=True)
        if capability < 90:
            continue                  # tensor descriptors (TMA) start with Hopper
        for dtype in ("bf16", "fp16"):
            for role in TMA_ROLES:
                for size in SIZES[:2]:
                    kernel = compile_tma_variant(capability, dtype, role, size)
                    regs, spills = register_use(kernel, capability)
                    print(f"sm_{capability} {dtype} TMA role={role!r} size={size} "
                          f"shared={kernel.metadata.shared} B regs={regs} spills={spills} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
