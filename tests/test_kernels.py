"""Fused kernels vs the reference dequantize-and-matmul: Triton (interpreter on CPU, compiled on CUDA), C++ CPU path.

``TRITON_INTERPRET=1`` must be set before triton is first imported (torch.compile imports it too):
tests/conftest.py sets it for the whole session; this module sets it as well so it also runs alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import decoupled_layer  # noqa: E402

from hfquant.kernels import cpu as cpu_kernel  # noqa: E402
from hfquant.kernels import triton_matmul  # noqa: E402
from hfquant.nn import DecoupledLinear  # noqa: E402

BITS = [2, 3, 4]
GROUPS = [32, 64, 128, -1]
needs_triton = pytest.mark.skipif(not triton_matmul.TRITON_INSTALLED, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the compiled Triton path is GPU-only"
)


def _layer(bits: int, group_size: int, in_f: int, out_f: int = 40, kept: int = 0, seed: int = 0):
    return decoupled_layer(bits, group_size, in_f, out_f, kept=kept, seed=seed)[1]


def _reference(module: DecoupledLinear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ module.dequantize(torch.float64).T + module.bias.double()


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("in_f", [96, 200, 512])  # 200: ragged last group, partial 32-value block; 512: GEMV tile inside one group
def test_triton_kernels_match_reference(bits, group_size, in_f):
    module = _layer(bits, group_size, in_f)
    for rows in (1, 5, triton_matmul.DEQUANT_MIN_ROWS):  # GEMV kernel, tl.dot kernel, dequantize + GEMM
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
        y = triton_matmul.qmatmul(
            x, module.qweight, module.scales, module.zeros, bits, group_size, in_f, module.bias
        )
        torch.testing.assert_close(y.double(), _reference(module, x), rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("group_size", "in_f"), [(32, 200), (64, 512), (-1, 96), (48, 200)])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_split_k_gemv_matches_reference(bits, group_size, in_f, split_k, prefetch):
    """Split-K GEMV: programs share a row's reduction (one split may get no tile); bias added once;
    groups that are not whole units (48) take the per-value path. With prefetch, each step's words
    come from the step before (up to 8 steps of 64 values; the last step's prefetch is masked)."""
    module = _layer(bits, group_size, in_f)
    config = triton_matmul.LaunchConfig("gemv", 1, 16, 64, split_k=split_k, prefetch=prefetch)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(split_k)).to(dtype)
        y = triton_matmul.qmatmul(
            x, module.qweight, module.scales, module.zeros, bits, group_size, in_f, module.bias, config=config
        )
        assert y.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.double(), _reference(module, x.float()), **tol)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("group_size", "in_f"), [(64, 200), (128, 512), (-1, 96), (48, 200)])
def test_dequantize_kernel_writes_the_grid_in_the_activation_dtype(bits, group_size, in_f):
    """Tiles past the last row and column are masked (40 rows in tiles of 32; 200 = 128 + 72).

    Exact in float32 and float16; bfloat16 within one unit in the last place (the interpreter's
    float32 -> bfloat16 cast truncates, torch's rounds to nearest).
    """
    module = _layer(bits, group_size, in_f)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = triton_matmul.dequantize(module.qweight, module.scales, module.zeros, bits, group_size, in_f, dtype)
        assert w.dtype == dtype and w.shape == (40, in_f)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(w, module.dequantize(torch.float32).to(dtype), rtol=ulp, atol=0)


def test_launch_config_by_rows():
    gemv, *gemm, dequant = triton_matmul.LAUNCH_CONFIGS[torch.float16]
    choose = triton_matmul.launch_config
    assert choose(1, torch.float16) == gemv and gemv.kernel == "gemv"
    rows = (2, 16, 17, 32, 33, 64, 65)
    assert [choose(r, torch.float16).block_m for r in rows] == [16, 16, 32, 32, 64, 64, 64]
    assert choose(triton_matmul.DEQUANT_MIN_ROWS - 1, torch.float16) == gemm[-1]
    assert choose(triton_matmul.DEQUANT_MIN_ROWS, torch.float16) == dequant and dequant.kernel == "dequant"
    with pytest.raises(ValueError, match="dequantize launches the dequant kernel"):
        triton_matmul.dequantize(torch.zeros(1, 2, dtype=torch.int32), None, None, 2, 64, 64, torch.float16, gemv)


def test_launch_config_errors_name_the_field():
    with pytest.raises(ValueError, match="kernel must be one of"):
        triton_matmul.LaunchConfig("gemm2", 16, 32, 256)
    with pytest.raises(ValueError, match="block_m must be 0 for the dequant kernel"):
        triton_matmul.LaunchConfig("dequant", 16, 32, 128)
    with pytest.raises(ValueError, match="block_m must be 0 for the dequant kernel"):
        triton_matmul.LaunchConfig("gemm", 0, 32, 128)


def test_split_k_is_refused_for_the_gemm_kernel():
    with pytest.raises(ValueError, match="split_k must be >= 1, and 1 for the gemm and dequant kernels"):
        triton_matmul.LaunchConfig("gemm", 16, 32, 256, split_k=2)
    with pytest.raises(ValueError, match="1 for the gemm and dequant kernels"):
        triton_matmul.LaunchConfig("dequant", 0, 32, 128, split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        triton_matmul.LaunchConfig("gemv", 1, 16, 256, split_k=0)
    with pytest.raises(ValueError, match="prefetch is a GEMV option"):
        triton_matmul.LaunchConfig("gemm", 16, 32, 256, prefetch=True)


def test_launch_config_rebuilds_from_its_tiles():
    """The torch.compile operator passes a configuration as its kernel and integer tiles."""
    config = triton_matmul.LaunchConfig("gemv", 1, 16, 512, split_k=2, prefetch=True)
    rebuilt = triton_matmul.LaunchConfig(config.kernel, *config.tiles)
    assert rebuilt == config and rebuilt.prefetch is True and rebuilt.name == "gemv 1x16x512 w4 s3 k2 pf"


@needs_triton
def test_torch_compile_keeps_each_launch_as_one_custom_op():
    """Under torch.compile (fullgraph: a graph break fails) every launch is one opaque operator with a
    fake, and the compiled function computes what the eager one does."""
    module = _layer(3, 64, 200)
    seen: list[str] = []

    def call(x: torch.Tensor) -> torch.Tensor:
        return triton_matmul.qmatmul(x, module.qweight, module.scales, module.zeros, 3, 64, 200, module.bias)

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward  # run the captured graph as traced (the custom ops launch the kernels)

    for rows in (1, 5, triton_matmul.DEQUANT_MIN_ROWS):
        op = "triton_dequantize" if rows >= triton_matmul.DEQUANT_MIN_ROWS else "triton_qmatmul"
        seen.clear()
        torch._dynamo.reset()
        x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows))
        y = torch.compile(call, backend=backend, fullgraph=True)(x)
        assert [t for t in seen if "hfquant" in t] == [f"hfquant.{op}"], seen
        torch.testing.assert_close(y.double(), _reference(module, x), rtol=1e-5, atol=1e-4)
        if shutil.which("g++") or shutil.which("c++"):  # Inductor's code around the operator (C++ on CPU)
            inductor = torch.compile(lambda x: torch.relu(call(x)), fullgraph=True)
            torch.testing.assert_close(inductor(x).double(), _reference(module, x).relu(), rtol=1e-5, atol=1e-4)


needs_cpu_kernel = pytest.mark.skipif(
    not cpu_kernel.available(), reason="C++ CPU kernel could not be built here"
)


@needs_cpu_kernel
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("in_f", [200, 576])
def test_cpu_kernel_matches_reference(bits, group_size, in_f):
    # Float32 sums in another order than the reference (and z * sum(x) instead of summing z * x):
    # errors stay below 1e-5 of the output's scale.
    module = _layer(bits, group_size, in_f, out_f=70, kept=9)
    for rows in (1, 3, cpu_kernel.MAX_ROWS):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            y = module(x)
        ref = _reference(module, x)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@needs_cpu_kernel
def test_cpu_kernel_in_bfloat16_and_batched_shapes():
    module = _layer(2, 64, 200, kept=3)
    x = torch.randn(2, 3, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        y = module(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference(module, x.float()), rtol=2e-2, atol=5e-2)


def test_unsupported_group_size_and_long_inputs_take_the_reference_path():
    module = _layer(2, 16, 200)  # 16-column groups split 32-value blocks: the kernel refuses them
    assert not cpu_kernel.supports(2, 16, 200)
    x = torch.randn(cpu_kernel.MAX_ROWS + 1, 200)
    for inp in (x[:2], x):
        torch.testing.assert_close(_layer(2, 16, 200)(inp), inp @ module.dequantize().T + module.bias)


_CUDA_CHECK = """
import torch
from torch import nn
from hfquant import HfQuantConfig
from hfquant.algorithms.rtn import rtn_quantize
from hfquant.nn import DecoupledLinear
worst = 0.0
for bits in (2, 3, 4):
    for gs in (32, 64, 128, -1):
        for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008), (96, 200)):
            linear = nn.Linear(in_f, out_f, device="cuda")
            config = HfQuantConfig(bits=bits, group_size=gs, method="rtn")
            m = DecoupledLinear.from_result(rtn_quantize(linear.weight.data, bits, gs), linear, config)
            for rows in (1, 4, 16, 512):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
                    ref = x.float() @ m.dequantize(torch.float32).T + m.bias
                    err = ((m.to(dtype)(x).float() - ref).abs().max() / ref.abs().max()).item()
                    worst = max(worst, err)
                    assert err < 2e-2, (bits, gs, out_f, in_f, rows, dtype, err)
print("worst relative error", worst)
"""


@needs_cuda
@needs_triton
def test_compiled_triton_kernels_on_gpu_at_real_shapes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    result = subprocess.run([sys.executable, "-c", _CUDA_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
