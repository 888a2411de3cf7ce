"""The Triton kernels compile for real GPUs (sm_80, 86, 89, 90) on this CPU-only machine.

Every launch configuration the dispatcher declares (``triton_matmul.LAUNCH_CONFIGS``), at every bit
width, is compiled ahead of time to a cubin with the ptxas shipped in the triton wheel
(:mod:`hfquant.kernels.aot`), and must fit the shared memory its target grants one program: Triton
checks that only at the first launch on a GPU. The session runs the kernels interpreted
(``TRITON_INTERPRET=1``, tests/conftest.py), so compilation happens in spawned worker processes
that import triton without it; all pairs are compiled once, in parallel, by a module fixture.
"""

from __future__ import annotations

import pytest

from hfquant.kernels import aot, triton_matmul

pytestmark = pytest.mark.skipif(not triton_matmul.TRITON_INSTALLED, reason="triton is not installed")

JOBS = aot.specs()
# The GEMV with the next step's words prefetched: not a default yet, a candidate benchmarks/gpu.py
# times (compiled here so that a GPU session does not find a compile error).
PREFETCH = triton_matmul.LaunchConfig("gemv", 1, 16, 512, prefetch=True)
PREFETCH_JOBS = [(aot.KernelSpec(PREFETCH, bits), cc) for bits in (2, 3, 4) for cc in (80, 90)]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], dict]:
    """Every (specialization, target) compiled once; resources from ``ptxas -v`` are left to the benchmark."""
    return {(r["name"], r["cc"]): r for r in aot.compile_all(JOBS + PREFETCH_JOBS, resources=False)}


def test_every_declared_configuration_is_compiled():
    configs = {s.config for s, _ in JOBS}
    assert configs == {c for table in triton_matmul.LAUNCH_CONFIGS.values() for c in table}
    for config in configs:
        assert {(s.bits, cc) for s, cc in JOBS if s.config == config} >= {
            (bits, cc) for bits in (2, 3, 4) for cc in aot.TARGETS
        }, config.name


def test_dispatcher_launches_only_declared_configurations():
    for dtype, table in triton_matmul.LAUNCH_CONFIGS.items():
        assert {triton_matmul.launch_config(rows, dtype) for rows in range(1, 600)} == set(table)


@pytest.mark.parametrize(("spec", "cc"), JOBS + PREFETCH_JOBS, ids=[f"sm{cc}-{s.name}" for s, cc in JOBS + PREFETCH_JOBS])
def test_kernel_compiles_and_fits_shared_memory(compiled, spec, cc):
    record = compiled[spec.name, cc]
    assert "error" not in record, record.get("error")
    assert record["shared"] <= aot.MAX_SHARED[cc], (
        f"{spec.name} needs {record['shared']} bytes of shared memory, sm_{cc} grants {aot.MAX_SHARED[cc]}"
    )
