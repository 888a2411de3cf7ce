"""Ahead-of-time compilation of the Triton kernels for real GPUs, on any machine (no GPU needed).

``triton.compile`` lowers a kernel to PTX and assembles it to a cubin with the ``ptxas`` shipped in
the triton wheel, for any CUDA architecture, without a driver. This module compiles every kernel at
every launch configuration the dispatcher uses (:data:`hfquant.kernels.triton_matmul.LAUNCH_CONFIGS`)
and every bit width, for the architectures in :data:`TARGETS`, and reads back what decides
occupancy: registers per thread, spilled bytes, shared memory per program. It checks what Triton
would otherwise only find at the first launch on the GPU: a program needing more shared memory than
the architecture grants raises ``OutOfResources`` there.

``@triton.jit`` decides when the kernels module is imported whether kernels are compiled or
interpreted, and the test session imports it under ``TRITON_INTERPRET=1``; so :func:`compile_all`
compiles in spawned worker processes started without that variable (in parallel, too).
``python -m hfquant.kernels.aot`` prints one line (or with ``--json`` one record) per compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch

from hfquant.kernels.triton_matmul import LAUNCH_CONFIGS, LaunchConfig

TARGETS = (80, 86, 89, 90)  # A100, RTX 30xx / A10 / A40, RTX 40xx / L4 / L40, H100 / H200
# Largest shared memory one program may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Float dtypes as Triton signatures spell them.
TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of a kernel as :func:`~hfquant.kernels.triton_matmul.qmatmul` launches it.

    ``dtype`` is that of the activations, scales, zeros and bias; ``aligned`` means every pointer is
    16-byte aligned and every size a multiple of 16, which Triton's launcher detects at run time
    and compiles a separate, vectorized variant for (Llama-sized layers); otherwise no hints.
    """

    config: LaunchConfig
    bits: int
    dtype: str = "float16"
    group_size: int = 64  # the kernel's GS: in_features for per-row grids
    has_bias: bool = True
    aligned: bool = True

    @property
    def name(self) -> str:
        extras = [self.dtype, f"GS{self.group_size}", "bias" if self.has_bias else "no bias"]
        extras.append("aligned" if self.aligned else "unaligned")
        return f"{self.config.name} W{self.bits} ({', '.join(extras)})"


def specs() -> list[tuple[KernelSpec, int]]:
    """(specialization, compute capability) pairs to compile, from the dispatcher's own table.

    Each launch configuration at every bit width for every target, in the first dtype that uses
    it, with bias (the dequantize kernel has none), 64-wide groups and aligned shapes (the Llama
    case). A configuration that another dtype reuses, and the other layout (per-row groups of
    11008, not a power of two, no bias, no alignment), are compiled at 3 bits (the widest code
    path) for the oldest and newest targets.
    """
    full: list[KernelSpec] = []
    reduced: list[KernelSpec] = []
    for dtype, configs in LAUNCH_CONFIGS.items():
        name = str(dtype).removeprefix("torch.")
        for c in configs:
            bias = c.kernel != "dequant"  # the dequantize kernel has no bias (cuBLAS adds it)
            if any(s.config == c for s in full):
                reduced.append(KernelSpec(c, 3, name, has_bias=bias))
            else:
                full += [KernelSpec(c, bits, name, has_bias=bias) for bits in (2, 3, 4)]
    layout = {"group_size": 11008, "has_bias": False, "aligned": False}
    reduced += [KernelSpec(c, 3, **layout) for c in LAUNCH_CONFIGS[torch.float16]]
    edges = (TARGETS[0], TARGETS[-1])
    return [(s, cc) for s in full for cc in TARGETS] + [(s, cc) for s in reduced for cc in edges]


def _signature(kernel, spec: KernelSpec) -> tuple[dict[str, str], dict[str, object], dict]:
    """Triton signature, constexpr values and alignment attributes of ``kernel`` for ``spec``."""
    act = TRITON_DTYPE[spec.dtype]
    pointers = {"x_ptr": act, "qw_ptr": "i32", "s_ptr": act, "z_ptr": act, "y_ptr": "fp32", "w_ptr": act}
    pointers["b_ptr"] = act if spec.has_bias else "fp32"  # without bias the launcher passes y
    constexprs = {
        "BITS": spec.bits,
        "GS": spec.group_size,
        "HAS_BIAS": spec.has_bias,
        **spec.config.constexprs(),
    }
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = f"*{pointers[name]}" if name.endswith("_ptr") else "i32"
    attrs = {}
    if spec.aligned:
        attrs = {
            (i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n not in constexprs
        }
    return signature, constexprs, attrs


def ptxas_resources(ptx: str, cc: int) -> dict[str, int]:
    """Registers, spills and stack from ``ptxas -v`` on the kernel's PTX (a cubin does not record spills).

    The same ptxas Triton picked for ``cc`` (the wheel ships a newer one for sm_90 and later).
    """
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
    }


def compile_kernel(spec: KernelSpec, cc: int):
    """Triton's compiled kernel (PTX, cubin and metadata in ``.asm`` / ``.metadata``) of ``spec`` for
    compute capability ``cc``. Raises whatever Triton raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from hfquant.kernels import _triton_kernels

    kernel = getattr(_triton_kernels, f"{spec.config.kernel}_kernel")
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("kernels were imported with TRITON_INTERPRET=1: compile in a process without it")
    signature, constexprs, attrs = _signature(kernel, spec)
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages},
    )


def compile_spec(spec: KernelSpec, cc: int, resources: bool = True) -> dict:
    """Compile ``spec`` for compute capability ``cc``; returns the specialization, target and resources.

    Raises whatever Triton raises on a compile error.
    """
    compiled = compile_kernel(spec, cc)
    record = {"spec": asdict(spec), "name": spec.name, "cc": cc, "shared": compiled.metadata.shared}
    record["max_shared"] = MAX_SHARED[cc]
    if resources:
        record |= ptxas_resources(compiled.asm["ptx"], cc)
    return record


def _compile_one(job: tuple[KernelSpec, int, bool]) -> dict:
    """Worker: compile one pair, turning a compile error into a record (so one failure names itself)."""
    spec, cc, resources = job
    try:
        return compile_spec(spec, cc, resources)
    except Exception:  # noqa: BLE001 - reported per specialization, the caller decides
        return {"spec": asdict(spec), "name": spec.name, "cc": cc, "error": traceback.format_exc()[-3000:]}


@contextmanager
def _without_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET`` unset while worker processes start: they inherit the environment, and
    whatever imports triton in them (torch does) must see the compiled mode from the start."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_all(
    jobs: list[tuple[KernelSpec, int]], resources: bool = True, workers: int | None = None
) -> list[dict]:
    """Compile every (spec, cc) pair in fresh worker processes, whatever this process imported; one record each.

    Safe to call from a process that runs the kernels interpreted (the test session): workers are
    spawned, not forked, with ``TRITON_INTERPRET`` removed from their environment.
    """
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with _without_interpreter(), ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_compile_one, [(s, cc, resources) for s, cc in jobs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--no-resources", action="store_true", help="skip the ptxas -v pass")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON record per line instead of a summary")
    args = parser.parse_args()
    jobs = [(s, cc) for s, cc in specs() if cc in args.cc]
    records = compile_all(jobs, resources=not args.no_resources, workers=args.workers)
    for r in records:
        if args.json:
            print(json.dumps(r))
        else:
            status = r.get("error") or f"{r.get('registers', '?')} registers, {r['shared']} bytes shared"
            print(f"sm_{r['cc']} {r['name']}: {status}")
    sys.exit(any("error" in r for r in records))


if __name__ == "__main__":
    main()
