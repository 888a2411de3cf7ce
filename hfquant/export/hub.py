"""Publishing: ``save_pretrained`` writes the model card, ``push_to_hub`` uploads the whole folder.

transformers' own ``push_to_hub`` replaces ``README.md`` with a generic card and uploads no
tokenizer, so a user who pushed an hfquant model would publish a checkpoint others cannot chat
with and that says nothing about how it was quantized. hfquant therefore gives every model it
quantizes or loads (:func:`enable_export`) a ``save_pretrained`` that also writes the card and a
``push_to_hub`` that saves the complete folder (weights, config, generation config, tokenizer,
chat template, card) and uploads it in one commit with ``huggingface_hub``.
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from hfquant.export.model_card import write_model_card
from hfquant.export.save import save_quantized


def _api() -> HfApi:
    from hfquant import __version__

    return HfApi(library_name="hfquant", library_version=__version__)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload hfquant model",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create ``repo_id`` if needed and upload a saved hfquant folder; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} is not a saved model folder (config.json and safetensors weights expected)")
    api = _api()
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )
    return str(getattr(commit, "commit_url", commit))


def _tokenizer_of(model: Any) -> Any:
    """The tokenizer quantization used, else the one saved beside the model's weights, else None."""
    config = getattr(model.config, "quantization_config", None)
    tokenizer = getattr(config, "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    source = tokenizer or getattr(model, "name_or_path", None)
    if source and os.path.isdir(source):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            return None
    return None


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload hfquant model",
    max_shard_size: int | str = "5GB",
    revision: str | None = None,
    create_pr: bool = False,
    gguf_type: str | None = None,
    gguf_eval_text: str | os.PathLike | None = None,
) -> str:
    """Save ``model`` (with its tokenizer and a card naming ``repo_id``) and upload the folder.

    ``gguf_type="q4_1"`` (or another GGUF type) uploads a GGUF file for llama.cpp beside the
    safetensors, with its type, llama.cpp perplexity and chat command in the card (see
    :func:`hfquant.export.save_quantized`)."""
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(
            model,
            Path(tmp) / "model",
            tokenizer,
            repo_id,
            gguf_type=gguf_type,
            gguf_eval_text=gguf_eval_text,
            max_shard_size=max_shard_size,
        )
        return push_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def _save_pretrained_with_card(self: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_model_card(self, save_directory)


def enable_export(model: Any) -> None:
    """Route ``model.save_pretrained`` / ``model.push_to_hub`` through hfquant (see module doc).

    Bound methods (not closures) so that ``copy.deepcopy(model)`` rebinds them to the copy.
    """
    model.save_pretrained = types.MethodType(_save_pretrained_with_card, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)
