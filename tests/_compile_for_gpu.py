"""Compile the Triton GEMM engine and the merge kernel ahead of time for an NVIDIA target, no GPU needed.

Run as a script in a process where Triton's interpreter is off (the test suite
enables it).  Triton lowers the kernel to PTX and assembles it with the ptxas it
ships, so compile errors that the interpreter cannot see — unsupported ops,
dtype mismatches in ``tl.dot``, shared-memory overflow of a config — surface on
a CPU-only machine.  Prints one line per variant; exits non-zero on the first
failure.

With the ptxas Triton ships, each line also reports the registers per thread
and the bytes spilled to local memory (``regs=255 spills=884`` is a kernel that
runs out of registers).

Decode-sized adapter launches (one token, small rank) are compiled as a real launch
specializes them and fail if the PTX packs two 32-bit lanes into one 64-bit register:
Triton 3.6's LLVM did so for the fp32 adapter forward at one token and rank 1 while M == 1
was a constant, and computed wrong columns (see ``packed_lanes``).  Triton releases without
that fault pass either way; run this script under Triton 3.6 to see the check bite.

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
from dynrank.kernels.merge import _merge_config, _merge_kernel

POINTERS = ("x_ptr", "wt_ptr", "u_ptr", "vt_ptr", "bias_ptr", "out_ptr", "w_ptr", "a_ptr", "b_ptr")
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Each role: (HAS_X, HAS_U, HAS_BIAS) and the strides that are 1 when
# lowrank_linear.py launches it on contiguous tensors (x, W_f (N, K), A (N, R),
# B (K, R), out).  At run time Triton makes an int argument equal to 1 a constant and marks
# pointers and ints that are multiples of 16 as such; the compile here does the same (with
# every other size and stride a multiple of 16, as on the target shapes), so the tile loads,
# the software pipeline and the register use are those of a real launch.
ROLES = {
    "adapter forward": ((True, True, True), ("stride_xk", "stride_wk", "stride_ur", "stride_vr", "stride_on")),
    "adapter dx": ((True, True, False), ("stride_xk", "stride_wn", "stride_ur", "stride_vr", "stride_on")),
    "lowrank chain": ((False, True, True), ("stride_ur", "stride_vr", "stride_on")),
    "x·B": ((True, False, False), ("stride_xk", "stride_wn", "stride_on")),
}
# (M, N) problem sizes that select each tile config of _native_config.
SIZES = [(4096, 4096), (512, 512), (8192, 16), (16, 4096)]
STRIDES = ("stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_um", "stride_ur", "stride_vr", "stride_vn",
           "stride_om", "stride_on")
# (M, K, N, R) of decode-sized adapter launches: one token, rank 1 (the shape that failed on the H200), 2 and 16.
DECODE_SHAPES = [(1, 17, 5, 1), (1, 40, 64, 1), (1, 4096, 4096, 1), (2, 17, 17, 1), (1, 17, 5, 2), (1, 64, 64, 16)]


def _signature(params, dtype, values, constexprs, index_64=False):
    """Signature and attributes of the engine's launch with these int arguments, as Triton specializes one.

    An int equal to 1 becomes a constant and a multiple of 16 is marked as one, unless the kernel
    declares the argument ``do_not_specialize``; pointers are 16-byte aligned (fresh allocations).
    """
    signature, attrs = {}, {}
    for index, param in enumerate(params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + dtype
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("alpha", "beta", "beta_over_alpha"):
            signature[name] = "fp32"
        else:
            value = values[name]
            if value == 1 and not param.do_not_specialize:
                constexprs[name] = 1
                signature[name] = "constexpr"
                continue
            # Triton types an int argument by its value: strides are i64 only on huge tensors.
            signature[name] = "i64" if index_64 and name.startswith("stride") else "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile(capability, dtype, flags, config, values, index_64=False, kernel=_lowrank_gemm_kernel):
    constexprs = dict(flags, DOT_FP32=False, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", INDEX_64=index_64,
                      **{k: v for k, v in config.items() if k.isupper()})
    signature, attrs = _signature(kernel.params, dtype, values, constexprs, index_64)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_variant(capability, dtype, role, size, index_64=False):
    import torch
    (has_x, has_u, has_bias), unit_strides = ROLES[role]
    config = _native_config(*size, getattr(torch, TORCH_NAMES[dtype]))
    # Every size and stride a multiple of 16, as on the target shapes, except the unit strides.
    values = {name: 16 * 256 for name in ("M", "N", "K", "R")}
    values.update({name: 1 if name in unit_strides else 16 * 256 for name in STRIDES})
    flags = dict(HAS_X=has_x, HAS_U=has_u, HAS_BIAS=has_bias)
    return _compile(capability, dtype, flags, config, values, index_64)


def compile_adapter_forward(capability, dtype, M, K, N, R):
    """The adapter forward ``y = x·W_fᵀ + xbs·Aᵀ + bias`` of contiguous x (M, K), W_f (N, K), A (N, R)."""
    import torch
    config = _native_config(M, N, getattr(torch, TORCH_NAMES[dtype]))
    values = dict(M=M, N=N, K=K, R=R, stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K, stride_um=R, stride_ur=1,
                  stride_vr=1, stride_vn=R, stride_om=N, stride_on=1)
    return _compile(capability, dtype, dict(HAS_X=True, HAS_U=True, HAS_BIAS=True), config, values)


# Ranks of the merge: below, at and past the tensor-core minimum of 16, one rank-loop step (64)
# and several (512).
MERGE_RANKS = (8, 16, 64, 512)


def compile_merge_variant(capability, dtype, rank, index_64=False):
    """The in-place merge ``W += alpha·A·Bᵀ`` of contiguous W (4096, 4096), A (4096, R), B (4096, R)."""
    import torch
    # fp32 factors take the FMA path (IEEE precision, TF32 off as in torch's default), 16-bit ones tl.dot.
    outer = dtype == "fp32"
    config = _merge_config(getattr(torch, TORCH_NAMES[dtype]), outer, rank)
    values = dict(N=4096, K=4096, R=rank, stride_wn=4096, stride_wk=1, stride_an=rank, stride_ar=1,
                  stride_bk=rank, stride_br=1)
    return _compile(capability, dtype, dict(OUTER=outer), config, values, index_64, kernel=_merge_kernel)


def packed_lanes(ptx):
    """True where the PTX splits a 64-bit register made by integer arithmetic into 32-bit lanes.

    A 64-bit *load* split into two fp32 values is ordinary; a 64-bit value computed by
    ``mul``/``shl``/``or``… and then split (``mov.b64 {_, %r}, %rd``) is two 32-bit lanes packed
    into one register.  Triton 3.6's LLVM did that to the engine's offsets for the fp32 adapter
    forward at one token and rank 1 while M == 1 was a constant, and one lane's top bit spilled
    into the other (the H200's wrong result of 2026-11-26).
    """
    defined_by = {}
    for line in ptx.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].startswith("%rd"):
            defined_by[fields[1].rstrip(",;")] = fields[0]
        unpack = re.match(r"\s*mov\.b64\s+\{[^}]*\},\s*(%rd\d+);", line)
        if unpack and not defined_by.get(unpack.group(1), "ld.").startswith(("ld.", "cvt.", "mov.")):
            return True
    return False


# The experimental TMA engine (kernels/lowrank_gemm_tma.py): W_T / V_T of its two adapter roles.
TMA_ROLES = {"adapter forward": (True, True), "adapter dx": (False, True)}


def compile_tma_variant(capability, dtype, role, size):
    import torch

    from dynrank.kernels.lowrank_gemm_tma import _lowrank_gemm_tma_kernel
    w_t, v_t = TMA_ROLES[role]
    config = _native_config(*size, getattr(torch, TORCH_NAMES[dtype]))
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
    merges = [(dtype, rank, False) for dtype in ("bf16", "fp16", "fp32") for rank in MERGE_RANKS]
    merges.append(("bf16", 16, True))
    for capability in capabilities:
        for dtype, role, size, index_64 in variants:
            kernel = compile_variant(capability, dtype, role, size, index_64)
            regs, spills = register_use(kernel, capability)
            print(f"sm_{capability} {dtype} role={role!r} size={size} int64={index_64} "
                  f"shared={kernel.metadata.shared} B regs={regs} spills={spills} ok", flush=True)
        for dtype, rank, index_64 in merges:
            kernel = compile_merge_variant(capability, dtype, rank, index_64)
            regs, spills = register_use(kernel, capability)
            print(f"sm_{capability} {dtype} merge rank={rank} int64={index_64} "
                  f"shared={kernel.metadata.shared} B regs={regs} spills={spills} ok", flush=True)
        for dtype in ("fp32", "bf16"):
            for shape in DECODE_SHAPES:
                kernel = compile_adapter_forward(capability, dtype, *shape)
                if packed_lanes(kernel.asm["ptx"]):
                    print(f"sm_{capability} {dtype} adapter forward (M, K, N, R)={shape}: two 32-bit lanes packed "
                          "in one 64-bit register (the miscompile of Triton 3.6's LLVM)", flush=True)
                    return 1
                regs, spills = register_use(kernel, capability)
                print(f"sm_{capability} {dtype} adapter forward (M, K, N, R)={shape} lanes=separate "
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
