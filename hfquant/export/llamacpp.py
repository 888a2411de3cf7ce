"""llama.cpp's source and built tools: where ``make llamacpp`` keeps them, and running them.

``make llamacpp`` unpacks the llama.cpp source vendored in the PyPI sdist of
``llama-cpp-python==LLAMACPP_SDIST_VERSION`` under ``<venv>/llama.cpp`` and builds its CPU tools
(``llama-perplexity``, ``llama-quantize``, ``llama-imatrix``, ``llama-bench``, ``llama-simple``)
into ``<venv>/llama.cpp/bin``. The GGUF writer (:mod:`hfquant.export.gguf`) uses the source's
converter; the model card (:mod:`hfquant.export.model_card`) reports the perplexity that the built
``llama-perplexity`` measures on an exported file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMACPP_SDIST_VERSION = "0.3.36"
CONTEXT = 512  # tokens per chunk, as hfquant's own perplexity windows


class LlamaCppError(RuntimeError):
    """A llama.cpp tool that is not built, or that failed (the message has its output's tail)."""


def llamacpp_dir() -> Path:
    """Where ``make llamacpp`` keeps llama.cpp: ``$HFQUANT_LLAMACPP`` or ``<venv>/llama.cpp``."""
    return Path(os.environ.get("HFQUANT_LLAMACPP") or Path(sys.prefix) / "llama.cpp")


def llamacpp_source() -> Path:
    """The vendored llama.cpp source tree (``$HFQUANT_LLAMACPP_SRC`` overrides)."""
    if os.environ.get("HFQUANT_LLAMACPP_SRC"):
        return Path(os.environ["HFQUANT_LLAMACPP_SRC"])
    return llamacpp_dir() / f"llama_cpp_python-{LLAMACPP_SDIST_VERSION}" / "vendor" / "llama.cpp"


def llamacpp_tool(name: str) -> Path:
    """Path of a built llama.cpp tool (``llama-perplexity``, ...); ``$HFQUANT_LLAMACPP_BIN`` overrides the folder."""
    folder = Path(os.environ.get("HFQUANT_LLAMACPP_BIN") or llamacpp_dir() / "bin")
    return folder / name


def llamacpp_perplexity(
    gguf_path: str | os.PathLike,
    text: str,
    chunks: int = 8,
    threads: int | None = None,
    context: int = CONTEXT,
    save_logits: str | os.PathLike | None = None,
) -> float:
    """``llama-perplexity``'s final estimate on ``text``: ``chunks`` consecutive ``context``-token
    chunks, each scoring its second half (llama.cpp's measure, not hfquant's whole-window one, so
    compare it only with other llama.cpp figures). ``save_logits`` also writes the scored tokens and
    their logits there (``--kl-divergence-base``), the base that :func:`llamacpp_kl_divergence`
    compares other files with. Raises :class:`LlamaCppError` when the tool is not built or fails, or
    when ``text`` is too short for one chunk."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        extra = ["--kl-divergence-base", os.fspath(save_logits)] if save_logits is not None else []
        output = _perplexity_tool(gguf_path, ["-f", file.name, "-c", str(context), "-b", str(context),
                                              "--chunks", str(chunks), *extra], threads)  # fmt: skip
    return _parse(output, r"Final estimate: PPL = ([0-9.]+)", gguf_path)


@dataclass(frozen=True)
class KLDivergence:
    """A GGUF file against saved base logits, on the same tokens (``llama-perplexity --kl-divergence``):
    paired, so small differences between two quantizations show where perplexities alone are noise."""

    ppl_ratio: float  # PPL(file) / PPL(base)
    ppl_ratio_unc: float  # its standard uncertainty
    mean_kld: float  # mean KL(base || file) per token, nats
    mean_kld_unc: float
    same_top: float  # share of tokens whose most likely next token is the base's


def llamacpp_kl_divergence(
    gguf_path: str | os.PathLike, base_logits: str | os.PathLike, threads: int | None = None
) -> KLDivergence:
    """Compare ``gguf_path`` with the logits :func:`llamacpp_perplexity` saved (``save_logits``) on the
    same tokens and context; raises :class:`LlamaCppError` as it does."""
    if not Path(base_logits).is_file():
        raise LlamaCppError(f"no saved base logits at {base_logits}: run llamacpp_perplexity(..., save_logits=...) first")
    output = _perplexity_tool(gguf_path, ["--kl-divergence-base", os.fspath(base_logits), "--kl-divergence"], threads)
    number = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"
    ratio = re.search(rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{number}\s*±\s*{number}", output)
    kld = re.search(rf"Mean\s+KLD:\s*{number}\s*±\s*{number}", output)
    top = _parse(output, rf"Same top p:\s*{number}", gguf_path)
    if not (ratio and kld):
        raise LlamaCppError(f"llama-perplexity --kl-divergence printed no statistics for {gguf_path}:\n{output[-2000:]}")
    return KLDivergence(float(ratio.group(1)), float(ratio.group(2)), float(kld.group(1)), float(kld.group(2)), top / 100)


def _perplexity_tool(gguf_path: str | os.PathLike, args: list[str], threads: int | None) -> str:
    """Run ``llama-perplexity`` on ``gguf_path``; its output, or :class:`LlamaCppError` if it fails."""
    tool = llamacpp_tool("llama-perplexity")
    if not tool.is_file():
        raise LlamaCppError(f"{tool} is not built: run `make llamacpp` (or set HFQUANT_LLAMACPP_BIN)")
    command = [str(tool), "-m", str(gguf_path), *args, "-t", str(threads or os.cpu_count() or 1), "--no-repack"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    output = run.stdout + run.stderr
    if run.returncode != 0:
        raise LlamaCppError(f"llama-perplexity failed on {gguf_path} (exit {run.returncode}):\n{output[-2000:]}")
    return output


def _parse(output: str, pattern: str, gguf_path: str | os.PathLike) -> float:
    found = re.search(pattern, output)
    if not found:
        raise LlamaCppError(f"llama-perplexity printed no {pattern!r} for {gguf_path}:\n{output[-2000:]}")
    return float(found.group(1))
