"""CPU fast path: a small C++ operator ``torch.ops.hfquant.qmatmul_cpu`` built with g++ at first use.

Dequantizing the whole matrix on every call moves 4 bytes per weight through several torch
passes, which makes a 2-bit model decode slower than float32. The operator in
``cpu_qmatmul.cpp`` reads the packed integers directly (2/3/4 bits, group sizes that are multiples
of 32 or one group per row), computes ``sum_g s_g * (x_g . Q_g) + z_g * sum(x_g)`` with SIMD-friendly
loops and splits output rows over torch's own thread pool. It is compiled once per source,
torch version and machine into ``$HFQUANT_CACHE/kernels`` (plain g++ with torch's headers: no ninja,
about half a minute) and loaded with ``torch.ops.load_library``. Any failure (no compiler, no
headers) leaves :func:`available` false and callers use the torch reference path.
``HFQUANT_CPU_KERNEL=0`` turns the operator off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

MAX_ROWS = 16  # input rows the operator handles per call; larger batches dequantize and use a GEMM
SOURCE = Path(__file__).with_name("cpu_qmatmul.cpp")

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _build(out: Path) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [
            os.environ.get("CXX", "g++"), "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC",
            "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(target),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed:\n{result.stderr[-2000:]}")
        os.replace(target, out)  # atomic: concurrent builders never load a half-written file


def _library_path() -> Path:
    from hfquant.models import cache_dir

    key = hashlib.sha256(
        SOURCE.read_bytes()
        + f"{torch.__version__}|{sys.version}|{platform.machine()}|{platform.node()}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"qmatmul_cpu_{key}.so"


def available() -> bool:
    """Whether ``torch.ops.hfquant.qmatmul_cpu`` is usable; builds and loads it on the first call."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("HFQUANT_CPU_KERNEL", "1") == "0" or sys.platform != "linux":
        return False
    try:
        path = _library_path()
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(path)
        torch.ops.load_library(str(path))
        torch.library.register_fake("hfquant::qmatmul_cpu")(_fake_qmatmul)
    except Exception as err:  # noqa: BLE001 - any build or load problem means: use the torch path
        warnings.warn(f"hfquant CPU kernel unavailable, using the slower torch path: {err}", stacklevel=3)
        return False
    return True


def _fake_qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Shape-only version for ``torch.compile`` tracing."""
    return x.new_empty(x.shape[0], qweight.shape[0])


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Shapes the operator handles: blocks of 32 values must never straddle two groups; no per-tensor grid."""
    return bits in (2, 3, 4) and group_size != 0 and (group_size == -1 or group_size >= in_features or group_size % 32 == 0)


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W_grid.T`` in float32 for ``x`` of at most :data:`MAX_ROWS` rows (no bias, no kept weights)."""
    return torch.ops.hfquant.qmatmul_cpu(
        x.float().contiguous(),
        qweight.contiguous(),
        scales.float().contiguous(),
        zeros.float().contiguous(),
        bits,
        group_size,
        in_features,
    )
