"""The model card (``README.md``) written beside every saved hfquant checkpoint.

A 2-bit model is only useful to others if its card says how it was made and what it costs in
quality, so the card is generated from what the run knows: the settings in the quantization
config, the bits per weight and file size actually stored, and the perplexities measured before
and after (when the run measured them, see :class:`QualityFigures`). The template is
``model_cards/hfquant.md`` (shipped as ``hfquant.model_cards``), rendered by ``huggingface_hub``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hfquant.config import FORMAT_VERSION, HfQuantConfig
from hfquant.export.save import bits_per_weight, folder_size
from hfquant.formats import format_for

TEMPLATE = "hfquant.md"
METHOD_NAMES = {
    "rtn": "round to nearest",
    "gptq": "GPTQ",
    "decoupleq": "decoupleQ",
    "inq": "INQ (incremental power-of-two quantization)",
}
GROUP_SIZE_NAMES = {-1: "one group per row", 0: "one group per matrix"}


@dataclass
class QualityFigures:
    """Perplexity of the model before and after quantization on the same named text."""

    text: str
    perplexity_before: float
    perplexity_after: float
    tokens: int | None = None


@dataclass
class GGUFFigures:
    """The GGUF file saved beside the safetensors (``save_quantized(..., gguf_type=...)``): what it
    stores and the perplexity llama.cpp's ``llama-perplexity`` measured on it."""

    file: str
    type: str
    file_bytes: int
    bits_per_weight: float
    lossless: int  # tensors written from the stored integers exactly
    requantized: int  # tensors quantized to the type at export (other grids, the output head)
    text: str = "held-out Book of Mormon chapters"
    chunks: int = 8
    perplexity: float | None = None
    not_measured: str = ""  # why perplexity is None


@dataclass
class SourceInfo:
    base_model: str | None = None
    license: str | None = None
    language: list[str] | None = None


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name and not os.path.exists(name)


def _front_matter(card_path: Path) -> dict[str, Any]:
    try:
        return ModelCard.load(card_path).data.to_dict()
    except (OSError, ValueError):
        return {}


def source_info(name_or_path: str | os.PathLike | None) -> SourceInfo:
    """Base model id, license and language of the model a card describes.

    A local folder's ``README.md`` is read: an hfquant card (a reloaded quantized model) names
    its own base model; any other card (a local copy of a base model) gives license and language
    and, where it records one, the Hub id in ``model_name``. A Hub id is the base model itself;
    its license is read from a cached ``README.md`` when there is one (no network).
    """
    if not name_or_path:
        return SourceInfo()
    name = str(name_or_path)
    if os.path.isdir(name):
        data = _front_matter(Path(name) / "README.md")
        if "hfquant" in (data.get("tags") or []):
            base = data.get("base_model")
        else:
            base = data.get("model_name")
        base = base if isinstance(base, str) and _is_repo_id(base) else None
    elif _is_repo_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
        data = _front_matter(Path(cached)) if isinstance(cached, str) else {}
        base = name
    else:
        return SourceInfo()
    language = data.get("language")
    return SourceInfo(
        base_model=base,
        license=data.get("license"),
        language=[language] if isinstance(language, str) else language,
    )


def _split(config: HfQuantConfig) -> bool:
    return config.split_clusters > 1


def _blockwise(config: HfQuantConfig) -> bool:
    """Block-wise minimization ran after the solve (rtn has no solve; INQ retrains instead)."""
    return config.method not in ("rtn", "inq") and config.blockwise_epochs > 0


def _method_text(config: HfQuantConfig) -> str:
    text = METHOD_NAMES[config.method]
    if config.hessian_shrink and config.method in ("gptq", "decoupleq"):
        text += f" (Hessian shrunk {config.hessian_shrink:g} toward its diagonal)"
    if _split(config):
        text = f"SplitQuant ({config.split_clusters} clusters) on {text}"
    if config.learned_rounding:
        text += " + learned rounding"
    if _blockwise(config):
        text += f" + block-wise minimization ({config.blockwise_epochs} epochs)"
    if config.e2e_epochs:
        text += f" + end-to-end tuning ({config.e2e_epochs} epochs)"
    if config.kept_fraction > 0:
        text += f" + {config.saliency} kept weights"
        if config.saliency != "magnitude" and config.saliency_grid == "solved":
            text += " (scored against a first solve)"
    return text


def _dynamic_text(config: HfQuantConfig) -> str:
    """Each ``dynamic`` rule as the card states it, in the order they apply."""
    rules = []
    for pattern, settings in (config.dynamic or {}).items():
        if pattern.startswith("-:"):
            rules.append(f"`{pattern[2:]}`: full precision")
            continue
        fields = [f"{settings['bits']} bits"] if "bits" in settings else []
        if "group_size" in settings:
            fields.append(f"group size {GROUP_SIZE_NAMES.get(settings['group_size'], settings['group_size'])}")
        rules.append(f"`{pattern.removeprefix('+:')}`: {', '.join(fields) or 'the base settings'}")
    # a "|" in a pattern would end the table cell
    return ("; ".join(rules) + " (first match wins)").replace("|", "\\|") if rules else "none"


def _calibration_text(config: HfQuantConfig) -> str:
    if config.method == "rtn" and config.kept_fraction == 0:
        return "none (round to nearest is data-free)"
    data = config.dataset if isinstance(config.dataset, str) else "user-supplied texts"
    if data == "mix":
        data = "mix (equal shares of Book of Mormon, Jargon File and zstd C source windows)"
    text = f"{data}, {config.nsamples} windows x {config.seqlen} tokens"
    if config.calibrate_all_experts:
        text += "; every MoE expert calibrated on every token"
    if config.kept_fraction > 0 and config.saliency != "magnitude":
        task = config.task_dataset if isinstance(config.task_dataset, str | os.PathLike) else None
        text += f"; task examples: {task or ('user-supplied examples' if config.task_dataset else data)}"
    return text


def _quality_text(quality: QualityFigures | None) -> str:
    if quality is None:
        return (
            "Not measured in the run that wrote this card. Measure it with "
            "`hfquant eval MODEL --text FILE` on the base model and on this one."
        )
    ratio = quality.perplexity_after / quality.perplexity_before
    tokens = f" ({quality.tokens:,} tokens)" if quality.tokens else ""
    return (
        f"Perplexity measured in the quantization run on {quality.text}{tokens}:\n\n"
        "| model | perplexity | x full precision |\n|---|---|---|\n"
        f"| full precision | {quality.perplexity_before:.2f} | 1.00 |\n"
        f"| this model | {quality.perplexity_after:.2f} | {ratio:.2f} |"
    )


def _storage_text(config: HfQuantConfig) -> str:
    return format_for(config).storage_line(config)


def tags(config: HfQuantConfig) -> list[str]:
    out = ["hfquant", f"{config.bits}-bit", "quantized", config.method]
    if _split(config):
        out.append("splitquant")
    if config.learned_rounding:
        out.append("learned-rounding")
    if _blockwise(config):
        out.append("blockwise-minimization")
    if config.e2e_epochs:
        out.append("end-to-end-tuning")
    if config.kept_fraction > 0:
        out.append(config.saliency)
    return out


def _gguf_text(gguf: GGUFFigures | None, model_id: str, folder: str | os.PathLike) -> str:
    if gguf is None:
        return ""
    tag = gguf.type.upper()
    if gguf.perplexity is not None:
        ppl = (f"{gguf.perplexity:.2f} (`llama-perplexity`, {gguf.chunks} chunks of 512 tokens of {gguf.text}; "
               "llama.cpp scores the second half of each chunk, so compare it with llama.cpp figures only)")  # fmt: skip
    else:
        ppl = f"not measured ({gguf.not_measured})"
    run = (f"llama-cli -hf {model_id}:{tag}" if _is_repo_id(model_id)
           else f"llama-cli -m {Path(folder).resolve() / gguf.file}")  # fmt: skip
    how = f"{gguf.lossless} tensors written exactly as hfquant solved them"
    if gguf.requantized:
        how += f", {gguf.requantized} quantized to the type at export (other grids, the output head)"
    return (
        "| file | type | size | bits per weight (whole file) | perplexity in llama.cpp |\n|---|---|---|---|---|\n"
        f"| `{gguf.file}` | {tag} | {gguf.file_bytes / 1e6:.1f} MB | {gguf.bits_per_weight:.3f} | {ppl} |\n\n"
        f"Tensors: {how}. Chat with it in llama.cpp (conversation mode, the model's own chat template):\n\n"
        f"```bash\n{run}\n```"
    )


def render_model_card(
    model: Any, folder: str | os.PathLike, model_id: str | None = None, gguf: GGUFFigures | None = None
) -> ModelCard:
    """The card of ``model`` as saved in ``folder`` (whose weight files give the size on disk);
    ``model_id`` is the Hub id or path the usage snippet loads (default: the folder); ``gguf`` the
    GGUF file saved beside, if any."""
    from hfquant import __version__

    config: HfQuantConfig = model.config.quantization_config
    if isinstance(config, dict):
        config = HfQuantConfig.from_dict(config)
    source = source_info(getattr(model, "name_or_path", None))
    quality = getattr(model, "hfquant_quality", None)
    data = ModelCardData(
        base_model=source.base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=source.license,
        language=source.language,
        tags=tags(config),
    )
    base = source.base_model or "This model"
    model_id = model_id or str(Path(folder).resolve())
    kept = config.kept_fraction
    template = resources.files("hfquant.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=f"{base.split('/')[-1] if source.base_model else Path(model_id).name} "
        f"({config.bits}-bit hfquant)",
        base_model_line=f"[{base}](https://huggingface.co/{base})" if source.base_model else base,
        bits=config.bits,
        group_size_text=GROUP_SIZE_NAMES.get(config.group_size, str(config.group_size)),
        dynamic_text=_dynamic_text(config),
        method_text=_method_text(config),
        calibration_text=_calibration_text(config),
        kept_text=f"{kept:.2%} ({config.saliency}, per {config.kept_scope})" if kept else "none",
        bits_per_weight=f"{bits_per_weight(model):.3f}",
        size_text=f"{folder_size(folder) / 1e6:.1f} MB",
        skipped_text=", ".join(config.modules_to_not_convert or ["lm_head"])
        + "; embeddings and norms are not linear layers and keep the model's dtype",
        hfquant_version=__version__,
        format_version=FORMAT_VERSION,
        quality_text=_quality_text(quality),
        model_id=model_id,
        storage_text=_storage_text(config),
        gguf_text=_gguf_text(gguf, model_id, folder),
    )


def write_model_card(
    model: Any, folder: str | os.PathLike, model_id: str | None = None, gguf: GGUFFigures | None = None
) -> Path:
    path = Path(folder) / "README.md"
    render_model_card(model, folder, model_id, gguf).save(path)
    return path


# Harness scores (``hfquant eval DIR --tasks ...``): a section written into an existing card, so
# that the figures of the quantization run already there are kept.
SCORES_HEADING = "## Benchmark scores"


@dataclass
class TaskScore:
    """One lm-evaluation-harness figure: a task's metric, its standard error, and the
    full-precision model's value when it was measured beside."""

    task: str
    metric: str
    value: float
    stderr: float | None = None
    full_precision: float | None = None


def scores_section(scores: list[TaskScore], note: str = "") -> str:
    """The markdown section of a card: heading, ``note`` (how they were run), then the table."""
    with_fp = any(s.full_precision is not None for s in scores)
    header = "| task | metric | value | stderr |" + (" full precision |" if with_fp else "")
    lines = [SCORES_HEADING, "", note, "", header, "|---" * (5 if with_fp else 4) + "|"]
    for s in scores:
        stderr = f"{s.stderr:.4f}" if s.stderr is not None else "n/a"
        row = f"| {s.task} | {s.metric} | {s.value:.4f} | {stderr} |"
        if with_fp:
            row += f" {s.full_precision:.4f} |" if s.full_precision is not None else " n/a |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def write_scores(folder: str | os.PathLike, scores: list[TaskScore], note: str = "") -> Path:
    """Put the scores section into ``folder/README.md``, replacing an earlier one, else before
    the usage section (or at the end)."""
    path = Path(folder) / "README.md"
    text = path.read_text(encoding="utf-8")
    section = scores_section(scores, note)
    start = text.find(SCORES_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + len(SCORES_HEADING))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        usage = text.find("## Usage")
        text = text[:usage] + section + "\n" + text[usage:] if usage >= 0 else text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")
    return path
