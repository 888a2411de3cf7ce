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
    gguf_path: str | os.PathLike, text: str, chunks: int = 8, threads: int | None = None, context: int = CONTEXT
) -> float:
    """``llama-perplexity``'s final estimate on ``text``: ``chunks`` consecutive ``context``-token
    chunks, each scoring its second half (llama.cpp's measure, not hfquant's whole-window one, so
    compare it only with other llama.cpp figures). Raises :class:`LlamaCppError` when the tool is not
    built or fails, or when ``text`` is too short for one chunk."""
    tool = llamacpp_tool("llama-perplexity")
    if not tool.is_file():
        raise LlamaCppError(f"{tool} is not built: run `make llamacpp` (or set HFQUANT_LLAMACPP_BIN)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        command = [str(tool), "-m", str(gguf_path), "-f", file.name, "-c", str(context), "-b", str(context),
                   "--chunks", str(chunks), "-t", str(threads or os.cpu_count() or 1), "--no-repack"]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    output = run.stdout + run.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if run.returncode != 0 or not found:
        raise LlamaCppError(f"llama-perplexity failed on {gguf_path} (exit {run.returncode}):\n{output[-2000:]}")
    return float(found.group(1))
