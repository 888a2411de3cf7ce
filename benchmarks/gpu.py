"""Issue 16 part B in one run on one CUDA GPU: kernel correctness, speed, memory, quantization time.

    pip install --no-deps -e . && python benchmarks/gpu.py OUT          # GPU machine, about 8 minutes
    PYTHONPATH=$PWD:$PWD/.gpu-deps python benchmarks/gpu.py OUT          # with bitsandbytes (make gpu-deps)
    python benchmarks/gpu.py OUT --sections layers e2e                    # a subset
    python benchmarks/gpu.py OUT --sections layers graph --decode-config 1 16 512 4 3 4 1
                                           # an earlier run's tune choice (its summary prints the tiles)
    python benchmarks/gpu.py OUT --smoke                                  # CPU, tiny shapes, seconds

Sections, each in its own process with a time budget (a CUDA error poisons its process, a slow
section is cut off: either loses only that section; each logs its progress as it goes):

* ``env``: versions, GPU, whether bitsandbytes imports.
* ``correctness``: every kernel (2/3/4 bits, groups of 32/64/128, a ragged last group, kept 16-bit
  weights) against the reference dequantize-and-matmul at Llama-7B shapes, batch 1/4/16/512, in
  float16 and bfloat16.
* ``generate``: a tiny chat model built from a config and a tokenizer trained on the spot, quantized
  at load (RTN), ``generate()`` on the GPU against the CPU, save and reload, ``hfquant chat --device``.
* ``tune``: candidate launch configurations (tile sizes, warps, stages, split-K; the fused kernel
  against dequantize-then-cuBLAS at 16 and 512 rows) against the
  dispatcher's choice at each Llama-7B shape, W2 g64, for batch 1, 16 and 512 rows
  (``--tune-regimes``), timed eagerly and replayed from a CUDA graph over layer copies that
  exceed the L2 cache; each candidate's output checked against the reference. The decode
  configuration fastest per Llama block is what ``correctness``, ``layers`` and ``graph`` then
  use (beside the default, in ``graph``).
* ``layers``: per-layer latency at the Llama-7B shapes, eager and in a CUDA graph, fp16 cuBLAS vs
  hfquant W2/W3/W4 g64 (and bitsandbytes NF4 when it imports).
* ``e2e``: a Llama-2-7B-shaped model with random weights, fp16 vs W2 g64 vs W4 g64 (quantized
  modules built from random codes): decode tokens/s at batch 1 and 8 (eager ``generate``),
  prefill tokens/s at 512, weight and peak memory.
* ``graph``: the same three models, batch-1 decode with a static KV cache and one decode step
  captured in a CUDA graph and replayed (no Python launch overhead), and a floor: the model with
  every decoder linear replaced by a memset (what the rest of the step costs).
* ``compile``: the ``graph`` section's decode with the step compiled by ``torch.compile`` first
  (Inductor fuses the floor's small kernels; hfquant's launches stay custom operators), fp16 vs
  W2 g64 and the floor, graph breaks counted.
* ``quantize``: decoupleQ + block-wise minimization at the library defaults on 2 blocks of the
  7B-shaped model (random calibration token ids: speed does not depend on them), time per stage
  (Hessian pass, solve, block-wise epochs), extrapolated to 32 blocks; peak GPU and host memory.

Writes ``OUT/<section>.md`` and ``.json``, ``OUT/gpu.log`` (everything the sections print),
``OUT/results.md`` (all tables under a dated header naming the GPU, to append to
benchmarks/RESULTS.md) and ``OUT/summary.md``, printed last. Needs only torch, transformers,
triton, hfquant and ``_common.py`` beside it (timing helpers; no Hub, no data sets). Speed does
not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import decode_tokens_per_s, random_layer, time_call
from torch import nn

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
RAGGED_SHAPE = (4096, 4000)  # 4000 = 31 x 128 + 32: a short last group at g64 and g128


REGIMES = ("decode", "few", "prefill")  # what the tune section times: batch 1, 16 rows, 512 rows


class Section:
    """What a section writes: tables (markdown), summary lines, and a progress log."""

    def __init__(self, name: str, out: Path, smoke: bool, regimes: tuple[str, ...] = REGIMES) -> None:
        self.name, self.out, self.smoke, self.regimes = name, out, smoke, regimes
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.min_seconds = 0.0 if smoke else 0.2  # per timing (smoke runs check the code, not speed)
        self.repeats = 1 if smoke else 3  # runs per decode timing, median taken
        self.markdown: list[str] = []
        self.summary: list[str] = []
        self.data: dict = {}

    def log(self, text: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {self.name}: {text}"
        print(line, flush=True)
        with (self.out / f"{self.name}.progress").open("a") as f:
            f.write(line + "\n")

    def table(self, title: str, rows: list[dict]) -> None:
        self.markdown.append(f"### {title}\n\n{markdown_table(rows)}\n")
        self.log(f"{title}\n{markdown_table(rows)}")

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(h, "")) for h in headers) + " |" for r in rows])


def llama_config(smoke: bool, layers: int, vocab: int | None = None):
    from transformers import LlamaConfig

    if smoke:
        size = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    else:
        size = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    return LlamaConfig(
        **size, num_hidden_layers=layers, vocab_size=vocab or (320 if smoke else 32000),
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def quantize_linears_(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every linear but ``lm_head`` by ``make(linear)``, freeing each dense weight at once."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
            del module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# A few times the L2 cache of any GPU here (H100 50 MiB, H200 60 MiB): graph timings cycle through
# enough copies of a layer that every call reads its weights from HBM, as in a real decode step.
L2_FLUSH_BYTES = 256 * 2**20


def copies_for(nbytes: int, sec: Section) -> int:
    """How many copies of a ``nbytes`` layer together exceed :data:`L2_FLUSH_BYTES` (2 to 64; 2 in smoke runs)."""
    return 2 if sec.smoke else min(64, max(2, -(-L2_FLUSH_BYTES // nbytes)))


def layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])


def graph_seconds(calls: list[Callable[[], object]], sec: Section) -> float:
    """Median GPU seconds per call, ``calls`` captured once in a CUDA graph and replayed.

    What a decode step costs inside a CUDA graph (or ``torch.compile(mode="reduce-overhead")``):
    no Python or launch overhead, which dominates eager timings of small layers. On CPU (smoke) the
    calls run eagerly.
    """
    if sec.device != "cuda":  # smoke run: the code path, once
        start = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - start) / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocations) outside the capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    sec.sync()
    samples: list[float] = []  # seconds per replay
    while sum(samples) < sec.min_seconds or len(samples) < 5:
        start = time.perf_counter()
        graph.replay()
        sec.sync()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] / len(calls)


def use_tuned_decode(sec: Section, dtype: torch.dtype):
    """The decode configuration this run's ``tune`` section chose (or ``--decode-config`` gave: an
    earlier run's choice), put in the dispatcher's table for ``dtype`` (so later sections measure
    what the next default would be); None if it is the default or there is none."""
    from hfquant.kernels import triton_matmul

    tuned = sec.out / "tune.json"
    choice = json.loads(tuned.read_text())["data"].get("decode_choice") if tuned.exists() else None
    gemv, *gemm = triton_matmul.LAUNCH_CONFIGS[dtype]
    if not choice or triton_matmul.LaunchConfig(*choice) == gemv:
        return None
    choice = triton_matmul.LaunchConfig(*choice)
    triton_matmul.LAUNCH_CONFIGS[dtype] = (choice, *gemm)
    sec.log(f"decode configuration chosen by tune (this run's, or --decode-config): {choice.name} (default {gemv.name})")
    return choice


# ----------------------------------------------------------------------------------------- sections


def section_env(sec: Section) -> None:
    import transformers

    import hfquant

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hfquant": hfquant.__version__,
        "device": sec.device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # noqa: BLE001 - any import problem means: no NF4 rows
        info["bitsandbytes"] = f"unavailable ({type(err).__name__})"
    if sec.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu memory (GiB)": f"{props.total_memory / 2**30:.1f}", "SMs": props.multi_processor_count}  # fmt: skip
    sec.table("Environment", [{"item": k, "value": v} for k, v in info.items()])
    sec.data = info
    sec.summary.append(
        " / ".join(f"{k} {info[k]}" for k in ("gpu", "torch", "transformers", "triton") if k in info)
    )


def section_correctness(sec: Section) -> None:
    from hfquant.kernels import triton_matmul

    tuned = [use_tuned_decode(sec, dtype) for dtype in (torch.float16, torch.bfloat16)]
    shapes = [(40, 200), (96, 256)] if sec.smoke else [*LLAMA7B_SHAPES, RAGGED_SHAPE]
    batches = (1, 4, 17) if sec.smoke else (1, 4, 16, 512)
    rows, failures, worst = [], 0, 0.0
    for bits in (2, 3, 4):
        for gs in (32, 64, 128):
            for out_f, in_f in [s for s in shapes if s != RAGGED_SHAPE or s[1] % gs]:
                kept = out_f * in_f // 500  # 0.2% kept 16-bit weights
                base = random_layer(out_f, in_f, bits, gs, torch.float16, sec.device, kept)
                for dtype in (torch.float16, torch.bfloat16):
                    layer = base.to(dtype)
                    w = layer.dequantize(torch.float32)
                    errs = []
                    for batch in batches:
                        x = torch.randn(batch, in_f, device=sec.device, dtype=dtype)
                        ref = x.float() @ w.T
                        with torch.no_grad():
                            y = layer(x).float()
                        errs.append(((y - ref).abs().max() / ref.abs().max()).item())
                    err = max(errs)
                    ok = err < 2e-2 and all(e == e for e in errs)  # NaN fails
                    failures += not ok
                    worst = max(worst, err)
                    configs = sorted({triton_matmul.launch_config(b, dtype).name for b in batches})
                    rows.append({"bits": bits, "group": gs, "out x in": f"{out_f} x {in_f}", "kept": kept,
                                 "dtype": str(dtype).removeprefix("torch."), "max rel err": f"{err:.2e}",
                                 "ok": "yes" if ok else "NO", "configs": ", ".join(configs)})  # fmt: skip
                    if not ok:
                        sec.log(f"FAILED: {rows[-1]}")
                del base
            sec.log(f"W{bits} g{gs} done, worst so far {worst:.2e}")
    path = "Triton kernels" if sec.device == "cuda" else "CPU path (smoke)"
    sec.table(f"Correctness vs dequantize + matmul ({path}; batches {batches}, max over batches)", rows)
    sec.data = {"failures": failures, "checks": len(rows), "worst": worst}
    sec.summary.append(
        f"{len(rows) - failures}/{len(rows)} layer checks ok, worst relative error {worst:.2e}"
        + (f" (decode: {tuned[0].name}, tuned)" if tuned[0] else "")
    )
    if failures:
        raise AssertionError(f"{failures} correctness checks failed (see the table)")


def tiny_chat_model(path: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained here and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Hello, how are you? I am a tiny model on a GPU. " * 20], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = llama_config(True, 2, vocab=len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def section_generate(sec: Section) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant import HfQuantConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_chat_model(Path(tmp) / "tiny")
        config = HfQuantConfig(bits=2, group_size=32, method="rtn")
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, quantization_config=config
        ).eval()
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cpu_logits = model(ids).logits
        model.to(sec.device)
        with torch.no_grad():
            dev_logits = model(ids.to(sec.device)).logits.cpu()
            out = model.generate(ids.to(sec.device), max_new_tokens=16, do_sample=False, pad_token_id=0)
        err = ((dev_logits - cpu_logits).abs().max() / cpu_logits.abs().max()).item()
        rows.append({"check": f"W2 g32 logits, {sec.device} vs cpu (max rel err)", "result": f"{err:.2e}"})
        rows.append({"check": "generate() new tokens", "result": f"{out.shape[1] - ids.shape[1]} per row"})
        saved = Path(tmp) / "w2"
        model.save_pretrained(saved)
        AutoTokenizer.from_pretrained(src).save_pretrained(saved)  # chat needs it next to the weights
        reloaded = AutoModelForCausalLM.from_pretrained(
            saved, dtype=torch.float16 if sec.device == "cuda" else None
        )
        reloaded.to(sec.device).eval()
        with torch.no_grad():
            again = reloaded.generate(ids.to(sec.device), max_new_tokens=16, do_sample=False, pad_token_id=0)
        rows.append(
            {
                "check": "reloaded checkpoint generate() new tokens",
                "result": f"{again.shape[1] - ids.shape[1]}",
            }
        )
        chat = "skipped (smoke run)"
        if not sec.smoke:  # a fresh interpreter: tens of seconds on a CPU-only test machine
            cmd = [str(Path(sys.executable).with_name("hfquant")), "chat", str(saved), "--device", sec.device]
            proc = subprocess.run(
                cmd, input="Hello, how are you?\n", capture_output=True, text=True, timeout=60
            )
            sec.log(f"$ {' '.join(cmd)}\nrc {proc.returncode}\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")
            chat = f"exit code {proc.returncode}"
        rows.append({"check": f"hfquant chat --device {sec.device}", "result": chat})
    sec.table("generate() and chat on a tiny quantized chat model", rows)
    sec.summary.append(f"tiny W2 model {sec.device} vs cpu logits {err:.1e}, chat {chat}")
    # float32 on CUDA: the kernels' tl.dot runs in TF32 (10-bit mantissa)
    if not err < 1e-2 or chat not in ("exit code 0", "skipped (smoke run)"):
        raise AssertionError("generate/chat check failed (see the table and the log)")


def nf4_maker(dtype: torch.dtype, device: str) -> Callable[[nn.Linear], nn.Module] | None:
    """bitsandbytes NF4 from a dense linear, or None when bitsandbytes does not import.

    The GPU machine has no package registry: ``make gpu-deps`` unpacks bitsandbytes into
    ``.gpu-deps/``, which a device call carries and puts on ``PYTHONPATH``.
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - any import problem: no NF4 row
        return None

    def make(lin: nn.Linear) -> nn.Module:
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
        )
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        return q.to(device)  # quantized as it moves

    return make


def section_layers(sec: Section) -> None:
    """Per-layer latency, eager (Python and launch overhead included) and replayed from a CUDA graph."""
    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    tuned = use_tuned_decode(sec, dtype)
    shapes = [(64, 128), (160, 64)] if sec.smoke else LLAMA7B_SHAPES
    batches = (1, 4) if sec.smoke else (1, 4, 16, 512)
    nf4 = nf4_maker(dtype, sec.device)
    rows = []
    for out_f, in_f in shapes:
        dense = nn.Linear(in_f, out_f, bias=False, device=sec.device, dtype=dtype)
        layers = {f"W{b} g64": random_layer(out_f, in_f, b, 64, dtype, sec.device) for b in (2, 3, 4)}
        if nf4:
            layers["bnb NF4"] = nf4(dense)
        variants = {"fp16": [dense] + [copy.deepcopy(dense) for _ in range(copies_for(layer_bytes(dense), sec) - 1)]}
        for name, layer in layers.items():
            variants[name] = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(layer_bytes(layer), sec) - 1)]
        for batch in batches:
            x = torch.randn(batch, in_f, device=sec.device, dtype=dtype)
            row = {"out x in": f"{out_f} x {in_f}", "rows": batch}
            with torch.no_grad():
                for name, copies in variants.items():
                    t = time_call(lambda layer=copies[0]: layer(x), sec.sync, sec.min_seconds)  # noqa: B023
                    g = graph_seconds([lambda layer=layer: layer(x) for layer in copies], sec)  # noqa: B023
                    row[f"{name} eager (us)"] = f"{t * 1e6:.1f}"
                    row[f"{name} graph (us)"] = f"{g * 1e6:.1f}"
                    if name != "fp16":
                        row[f"{name} graph x fp16"] = f"{float(row['fp16 graph (us)']) / (g * 1e6):.2f}"
            rows.append(row)
            sec.log(str(row))
        del variants, layers, dense
    sec.table(
        f"Per-layer latency, {dtype} activations, median: eager, and replayed from a CUDA graph over "
        f"{L2_FLUSH_BYTES >> 20} MiB of layer copies (speed-up = fp16 time / layer time, graph)"
        + (f"; batch 1 with the tuned {tuned.name}" if tuned else ""),
        rows,
    )
    batch1 = [r for r in rows if r["rows"] == 1]
    sec.summary.append(
        "batch-1 W2 g64 speed-up vs fp16 in a graph: "
        + ", ".join(f"{r['out x in']} {r['W2 g64 graph x fp16']}" for r in batch1)
    )
    if not nf4:
        sec.summary.append("bitsandbytes not importable (make gpu-deps): no NF4 column")


# Launch configurations the ``tune`` section times against the dispatcher's choice (W2 g64, fp16):
# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k[, prefetch]), for batch 1 / few rows /
# prefill.
CANDIDATES = {
    "decode": [("gemv", 1, n, k, w, 3, sk) for n, k, w, sk in
               [(16, 512, 4, 4), (16, 512, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (16, 256, 4, 8), (32, 256, 4, 4),
                # around the H100's best (16 x 512, 4 warps, split 4): warps, split, rows per program
                (16, 512, 2, 4), (16, 512, 8, 4), (16, 512, 4, 2), (16, 512, 4, 8), (8, 512, 4, 4),
                (32, 512, 4, 4), (16, 1024, 4, 2), (8, 512, 2, 8)]]
              # the next step's words loaded before this step's arithmetic: unsplit, where a program
              # takes 8 (4096 wide) or 22 (11008) serial steps, and split, with fewer steps and more programs
              + [("gemv", 1, n, k, w, 3, sk, True) for n, k, w, sk in
                 [(16, 512, 4, 1), (8, 512, 4, 1), (32, 512, 4, 1), (16, 256, 4, 1), (16, 1024, 4, 1),
                  (16, 512, 4, 2), (16, 512, 4, 4), (32, 512, 4, 2)]],
    "few": [("gemm", 16, n, k, w, s, 1) for n, k, w, s in
            [(32, 256, 4, 3), (16, 256, 4, 3), (32, 512, 4, 3), (64, 256, 4, 3), (32, 128, 4, 4), (32, 256, 8, 3)]]
           + [("gemv", 1, 16, 512, 4, 3, 4), ("dequant", 0, 32, 128, 4, 1, 1)],
    "prefill": [("gemm", m, n, k, w, s, 1) for m, n, k, w, s in
                [(64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (128, 64, 128, 8, 3), (64, 128, 128, 8, 3),
                 (128, 128, 64, 8, 4), (64, 64, 256, 4, 3)]]
               + [("dequant", 0, n, k, w, 1, 1) for n, k, w in [(32, 128, 4), (64, 128, 4), (16, 256, 4), (64, 256, 8)]],
}  # fmt: skip
# The dequant candidates (the dense weight written once, then cuBLAS) at 16 and 512 rows bracket the
# crossover the dispatcher places at triton_matmul.DEQUANT_MIN_ROWS.
# How often each Llama-7B shape occurs in a decoder block (q/k/v/o, gate/up, down): the weights of
# the per-block time that picks one decode configuration for all of them.
SHAPE_COUNT = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}


def section_tune(sec: Section) -> None:
    """Each candidate launch configuration at each Llama-7B shape (W2 g64, fp16), beside the default.

    Timed eagerly (what HF's eager ``generate`` pays: Python and launch overhead included) and
    replayed from a CUDA graph over enough layer copies to defeat the L2 cache (the kernel alone);
    every candidate's output is checked against the dequantize-and-matmul reference.
    """
    from hfquant.kernels import triton_matmul

    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    shapes = [(64, 256)] if sec.smoke else LLAMA7B_SHAPES
    batches = {"decode": 1, "few": 4 if sec.smoke else 16, "prefill": 32 if sec.smoke else 512}
    batches = {r: b for r, b in batches.items() if r in sec.regimes}
    rows, best, per_block, measured = [], {}, {}, {}
    for out_f, in_f in shapes:
        layer = random_layer(out_f, in_f, 2, 64, dtype, sec.device)
        copies = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(layer_bytes(layer), sec) - 1)]
        dense = [torch.randn(out_f, in_f, device=sec.device, dtype=dtype)]
        dense += [d.clone() for d in dense * (copies_for(dense[0].numel() * dense[0].element_size(), sec) - 1)]
        ref_w = layer.dequantize(torch.float32)
        for regime, batch in batches.items():
            x = torch.randn(batch, in_f, device=sec.device, dtype=dtype)
            ref = x.float() @ ref_w.T
            t_fp = time_call(lambda: F.linear(x, dense[0]), sec.sync, sec.min_seconds)  # noqa: B023
            g_fp = graph_seconds([lambda d=d: F.linear(x, d) for d in dense], sec)  # noqa: B023
            default = triton_matmul.launch_config(batch, dtype)
            candidates = CANDIDATES[regime]
            candidates = [candidates[0], candidates[-1]] if sec.smoke else candidates
            configs = [triton_matmul.LaunchConfig(*c) for c in candidates]
            timed = {}
            for config in [default, *[c for c in configs if c != default]]:
                def call(c=config, lay=layer):
                    return triton_matmul.qmatmul(x, lay.qweight, lay.scales, lay.zeros, 2, 64, in_f, config=c)  # noqa: B023

                try:
                    err = ((call().float() - ref).abs().max() / ref.abs().max()).item()
                    t = time_call(call, sec.sync, sec.min_seconds)
                    g = graph_seconds([lambda c=config, lay=lay: call(c, lay) for lay in copies], sec)
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile here is a finding
                    sec.log(f"{config.name}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                timed[config] = g
                if regime == "decode":
                    per_block[config] = per_block.get(config, 0.0) + SHAPE_COUNT.get((out_f, in_f), 1) * g
                    measured[config] = measured.get(config, 0) + 1
                rows.append({"out x in": f"{out_f} x {in_f}", "rows": batch, "config": config.name,
                             "default": "yes" if config == default else "", "eager us": f"{t * 1e6:.1f}",
                             "eager x fp16": f"{t_fp / t:.2f}", "graph us": f"{g * 1e6:.1f}",
                             "graph x fp16": f"{g_fp / g:.2f}", "max rel err": f"{err:.1e}"})  # fmt: skip
                if not err < 2e-2:
                    raise AssertionError(f"{config.name} at {out_f}x{in_f}: relative error {err:.2e}")
            fastest = min(timed, key=timed.get)
            best[f"{out_f}x{in_f} b{batch}"] = {"best": fastest.name, "graph us": timed[fastest] * 1e6,
                                                "default graph us": timed[default] * 1e6, "fp16 graph us": g_fp * 1e6}  # fmt: skip
            sec.log(f"{out_f}x{in_f} b{batch}: fastest in a graph {fastest.name} {timed[fastest] * 1e6:.1f} us, "
                    f"default {timed[default] * 1e6:.1f} us, fp16 {g_fp * 1e6:.1f} us")  # fmt: skip
    sec.table(f"Launch configurations, W2 g64, {dtype} activations, median: eager, and replayed from a CUDA graph "
              f"over {L2_FLUSH_BYTES >> 20} MiB of layer copies", rows)  # fmt: skip
    sec.data = {"best": best}
    if per_block:
        everywhere = [c for c in per_block if measured[c] == len(shapes)]  # ran at every shape
        choice = min(everywhere, key=per_block.get)
        default = triton_matmul.launch_config(1, dtype)
        sec.data["decode_choice"] = [choice.kernel, *choice.tiles]
        sec.summary.append(
            f"decode (graph, weighted per block): best {choice.name} {per_block[choice] * 1e6:.1f} us vs default "
            f"{default.name} {per_block[default] * 1e6:.1f} us (--decode-config {' '.join(map(str, choice.tiles))})"
        )
    sec.summary.append("fastest: " + "; ".join(f"{k} {v['best']} {v['graph us']:.1f} us" for k, v in best.items()))


def graph_decode_tokens_per_s(
    model: nn.Module,
    batch: int,
    new_tokens: int,
    device: str,
    repeats: int,
    log: Callable[[str], None],
    step_model: Callable | None = None,
) -> float:
    """Greedy decode with a static KV cache and one decode step captured in a CUDA graph and replayed.

    What serving engines and ``torch.compile(mode="reduce-overhead")`` do: the GPU's time per token
    without Python's per-module launch overhead, which dominates eager ``generate`` of both models.
    ``step_model`` (e.g. ``torch.compile(model)``) runs the decode step instead of ``model``; the
    prompt is always run by ``model``. On CPU (smoke) the same steps run without capture.
    """
    step_model = model if step_model is None else step_model
    from transformers import StaticCache

    prompt_len = 16
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + 2 * new_tokens + 8)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(prompt_len, device=device))
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        synchronize()
        log("static-cache prefill ok")

        def step() -> torch.Tensor:
            return step_model(input_ids=ids, past_key_values=cache, cache_position=pos,
                              position_ids=pos.expand(batch, 1), use_cache=True).logits  # fmt: skip

        step()
        synchronize()
        log("eager static-cache step ok")
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            graph.replay()
            synchronize()
            log("captured and replayed")
            replay = graph.replay
        else:
            holder = {}
            replay = lambda: holder.__setitem__("logits", step())  # noqa: E731

        def run(n: int) -> float:
            rewind(cache, prompt_len)
            synchronize()
            start = time.perf_counter()
            for i in range(n):
                pos.fill_(prompt_len + i)
                replay()
                out = logits if device == "cuda" else holder["logits"]
                ids.copy_(out[:, -1].argmax(-1, keepdim=True))
            synchronize()
            return time.perf_counter() - start

        run(2)
        seconds = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    return batch * new_tokens / seconds


def rewind(cache, length: int) -> None:
    """Set a static KV cache's write position back to ``length``.

    transformers' ``StaticLayer`` writes at its own ``cumulative_length`` (a device tensor that each
    step advances, the ``cache_position`` passed in only shapes the mask), so a replayed step keeps
    advancing it: without a rewind the second timed loop wrote past the cache's end (the
    device-side assert of the first H100 run).
    """
    for layer in cache.layers:
        if torch.is_tensor(getattr(layer, "cumulative_length", None)):
            layer.cumulative_length.fill_(length)


def section_e2e(sec: Section) -> None:
    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    layers = 2 if sec.smoke else 32
    new_tokens = 8 if sec.smoke else 32
    prefill_len = 64 if sec.smoke else 512
    config = llama_config(sec.smoke, layers)
    builds: list[tuple[str, int | None]] = [
        ("fp16" if dtype == torch.float16 else "fp32", None),
        ("W2 g64", 2),
        ("W4 g64", 4),
    ]
    rows, base = [], None
    for name, bits in builds:
        if sec.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = decode_model(config, dtype, bits, sec.device)
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        linear_bytes = sum(
            t.numel() * t.element_size()
            for n, m in model.named_modules() if n.startswith("model.layers.")
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        )  # fmt: skip
        if sec.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = {"model": name}
        for batch in (1, 8):
            prompt = torch.randint(0, config.vocab_size, (batch, 16), device=sec.device)
            row[f"decode b{batch} (tok/s)"] = decode_tokens_per_s(
                model, prompt, new_tokens, sec.sync, sec.repeats
            )
            sec.log(f"{name}: decode batch {batch} {row[f'decode b{batch} (tok/s)']:.1f} tokens/s")
        prompt = torch.randint(0, config.vocab_size, (1, prefill_len), device=sec.device)
        with torch.no_grad():
            t = time_call(lambda m=model, p=prompt: m(p, use_cache=False), sec.sync, sec.min_seconds)
        row[f"prefill {prefill_len} (tok/s)"] = prefill_len / t
        row["block weights (GiB)"] = linear_bytes / 2**30
        row["all weights (GiB)"] = weights / 2**30
        row["peak (GiB)"] = (
            torch.cuda.max_memory_allocated() / 2**30 if sec.device == "cuda" else float("nan")
        )
        base = base or row
        row["decode b1 x fp16"] = row["decode b1 (tok/s)"] / base["decode b1 (tok/s)"]
        row["block weights x fp16"] = row["block weights (GiB)"] / base["block weights (GiB)"]
        rows.append(row)
        sec.log(f"{name}: {row}")
        del model
    text = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    sec.table(
        f"Llama-2-7B-shaped model ({layers} blocks, random weights), greedy decode of {new_tokens} tokens after a "
        f"16-token prompt (prefill excluded), prefill of {prefill_len} tokens; block weights = decoder blocks only",
        text,
    )
    sec.data = {"rows": rows}
    w2 = next(r for r in rows if r["model"] == "W2 g64")
    sec.summary.append(
        f"W2 decode b1 {w2['decode b1 x fp16']:.2f}x fp16 (eager generate), W2 block weights "
        f"{w2['block weights x fp16']:.3f}x fp16 (goal 0.2x)"
    )


class ZerosLinear(nn.Module):
    """A linear layer's output shape, all zeros, at the cost of one memset: with every decoder linear
    replaced by it, a decode step's time is what the rest of the model (norms, rotary embedding,
    attention, KV cache) costs, the floor no weight format can go below."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def decode_model(config, dtype: torch.dtype, bits: int | None, device: str) -> nn.Module:
    """The model of ``config`` with random weights: dense (``bits`` None), every decoder linear
    W``bits`` g64 from random codes, or (``bits`` 0) every decoder linear a memset, the floor."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if bits == 0:
        quantize_linears_(model, lambda lin: ZerosLinear(lin.out_features))
    elif bits:
        quantize_linears_(
            model, lambda lin: random_layer(lin.out_features, lin.in_features, bits, 64, dtype, device)
        )
    return model


def section_graph(sec: Section) -> None:
    """Batch-1 decode of the 7B-shaped model with one step captured in a CUDA graph, fp16 vs W2/W4 g64.

    Its own process: a failure here (capture is strict about what a step may do) must not cost the
    other sections. When the ``tune`` section of the same run chose another decode configuration
    than the dispatcher's, W2 and W4 are timed with it as well.
    """
    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    config = llama_config(sec.smoke, 2 if sec.smoke else 32)
    new_tokens = 8 if sec.smoke else 32
    from hfquant.kernels import triton_matmul

    builds: list[tuple[str, int | None, triton_matmul.LaunchConfig | None]] = [
        ("fp16" if dtype == torch.float16 else "fp32", None, None), ("W2 g64", 2, None), ("W4 g64", 4, None),
        ("no linear layers (floor)", 0, None),
    ]  # fmt: skip
    gemv, *gemm = triton_matmul.LAUNCH_CONFIGS[dtype]
    choice = use_tuned_decode(sec, dtype)
    if choice:
        builds += [(f"W2 g64, {choice.name}", 2, choice), (f"W4 g64, {choice.name}", 4, choice)]
    rows = []
    for name, bits, launch in builds:
        triton_matmul.LAUNCH_CONFIGS[dtype] = (launch or gemv, *gemm)
        model = decode_model(config, dtype, bits, sec.device)
        tps = graph_decode_tokens_per_s(model, 1, new_tokens, sec.device, sec.repeats, lambda t, n=name: sec.log(f"{n}: {t}"))
        rows.append({"model": name, "graph decode b1 (tok/s)": tps, "ms per token": 1e3 / tps,
                     "x fp16": tps / (rows[0]["graph decode b1 (tok/s)"] if rows else tps)})  # fmt: skip
        sec.log(f"{name}: {tps:.1f} tokens/s")
        del model
        if sec.device == "cuda":
            torch.cuda.empty_cache()
    sec.table(
        f"Batch-1 greedy decode, static KV cache, one decode step replayed from a CUDA graph ({new_tokens} tokens)",
        [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    )
    sec.data = {"rows": rows}
    sec.summary.append(
        "decode b1 with CUDA graphs x fp16 (goal 2.5x for W2): "
        + ", ".join(f"{r['model']} {r['x fp16']:.2f}" for r in rows[1:])
    )


def section_compile(sec: Section) -> None:
    """Batch-1 decode as in ``graph``, the decode step compiled by ``torch.compile`` (Inductor) first.

    The ``graph`` section's floor (norms, rotary embedding, attention, KV-cache writes: 2.86 of the
    8.12 ms of an fp16 step on an H100) is a string of small eager kernels that Inductor fuses; the
    hfquant kernels stay whole, one custom operator per launch (``hfquant::triton_qmatmul``). The
    step is then captured in a CUDA graph as before. Graph breaks are counted: hfquant's modules
    should add none. Smoke runs (CPU) trace with the ``aot_eager`` backend: the same graph capture
    and fake shapes, no code generation.
    """
    from torch._dynamo.utils import counters

    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    config = llama_config(sec.smoke, 2 if sec.smoke else 32)
    new_tokens = 8 if sec.smoke else 32
    backend = "aot_eager" if sec.smoke else "inductor"
    builds: list[tuple[str, int | None]] = [
        ("fp16" if dtype == torch.float16 else "fp32", None), ("W2 g64", 2), ("no linear layers (floor)", 0),
    ]  # fmt: skip
    rows = []
    for name, bits in builds:
        model = decode_model(config, dtype, bits, sec.device)
        torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        compiled = torch.compile(model, backend=backend, dynamic=False)
        tps = graph_decode_tokens_per_s(
            model, 1, new_tokens, sec.device, sec.repeats, lambda t, n=name: sec.log(f"{n}: {t}"), compiled
        )
        breaks = sum(counters["graph_break"].values())
        if not counters["stats"]["unique_graphs"]:
            raise RuntimeError(f"{name}: torch.compile captured no graph")
        rows.append({"model": name, "compiled graph decode b1 (tok/s)": tps, "ms per token": 1e3 / tps,
                     "x fp16": tps / (rows[0]["compiled graph decode b1 (tok/s)"] if rows else tps),
                     "graphs": counters["stats"]["unique_graphs"], "graph breaks": breaks,
                     "compile + timing (s)": time.perf_counter() - start})  # fmt: skip
        sec.log(f"{name}: {tps:.1f} tokens/s, {breaks} graph breaks {dict(counters['graph_break'])}")
        del model, compiled
        if sec.device == "cuda":
            torch.cuda.empty_cache()
    sec.table(
        f"Batch-1 greedy decode, static KV cache, one decode step compiled by torch.compile ({backend}) and "
        f"replayed from a CUDA graph ({new_tokens} tokens)",
        [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    )
    sec.data = {"rows": rows}
    sec.summary.append(
        "compiled decode b1 x fp16 (goal 2.5x for W2): "
        + ", ".join(f"{r['model']} {r['x fp16']:.2f} ({r['graph breaks']} breaks)" for r in rows[1:])
    )


def section_quantize(sec: Section) -> None:
    from transformers import AutoModelForCausalLM

    from hfquant import HfQuantConfig
    from hfquant.driver import quantize_model

    blocks, total_blocks = 2, 32
    config = llama_config(sec.smoke, blocks)
    shape = (4, 32) if sec.smoke else (128, 512)  # the library defaults: 128 windows x 512 tokens
    # Random calibration token ids (speed does not depend on them), given as windows: no tokenizer.
    ids = torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    # End-to-end tuning runs on the whole model, so 2 blocks do not extrapolate it: off here.
    qconfig = HfQuantConfig(
        bits=2, group_size=64, method="decoupleq", e2e_epochs=0, dataset=ids, nsamples=shape[0], seqlen=shape[1]
    )
    dtype = torch.float16 if sec.device == "cuda" else torch.float32
    with torch.device(sec.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if sec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec.log(f"quantizing {blocks} blocks: nsamples {qconfig.nsamples} x seqlen {qconfig.seqlen}, "
            f"decoupleq_iters {qconfig.decoupleq_iters}, blockwise_epochs {qconfig.blockwise_epochs}")  # fmt: skip
    start = time.perf_counter()
    report = quantize_model(model, qconfig, progress=False)
    sec.sync()
    wall = time.perf_counter() - start
    seconds = dict(report.stage_seconds)  # the driver's own stage timing, GPU synchronized
    once = seconds.pop("calibration", 0.0)  # per model, not per block
    per_block = sum(seconds.values()) / blocks
    rest = wall - once - sum(seconds.values())  # block input capture, module swaps, propagation
    estimate = once + (rest + per_block * blocks) / blocks * total_blocks
    rows = [
        {"stage": s, "seconds (2 blocks)": f"{t:.1f}", "share": f"{t / wall:.0%}"} for s, t in seconds.items()
    ]
    rows.append(
        {
            "stage": "other (calibration, capture, swaps, propagation)",
            "seconds (2 blocks)": f"{rest + once:.1f}",
            "share": f"{(rest + once) / wall:.0%}",
        }
    )
    rows.append({"stage": "total", "seconds (2 blocks)": f"{wall:.1f}", "share": "100%"})
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if sec.device == "cuda" else float("nan")
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    sec.table(
        f"decoupleQ + block-wise minimization, W2 g64, library defaults without end-to-end tuning, {blocks} blocks of the 7B-shaped model "
        f"(stages timed by the driver: {', '.join(seconds)}); extrapolated to {total_blocks} blocks: "
        f"{estimate / 60:.1f} min; peak GPU {peak_gpu:.1f} GiB, peak host {peak_host:.1f} GiB",
        rows,
    )
    sec.data = {
        "seconds": seconds,
        "wall": wall,
        "estimate_32": estimate,
        "peak_gpu": peak_gpu,
        "peak_host": peak_host,
    }
    sec.summary.append(
        f"7B quantization estimate {estimate / 60:.1f} min for {total_blocks} blocks (goal < 30), "
        + ", ".join(f"{s} {t / wall:.0%}" for s, t in seconds.items())
        + f"; peak GPU {peak_gpu:.1f} GiB, host {peak_host:.1f} GiB"
    )


SECTIONS: dict[str, tuple[int, Callable[[Section], None]]] = {  # name: (budget in seconds, function)
    "env": (15, section_env),
    "correctness": (140, section_correctness),
    "tune": (200, section_tune),
    "layers": (100, section_layers),
    "e2e": (110, section_e2e),
    "graph": (180, section_graph),
    "compile": (300, section_compile),
    "quantize": (100, section_quantize),
    "generate": (35, section_generate),
}


def run_section(name: str, out: Path, smoke: bool, regimes: tuple[str, ...] = REGIMES) -> dict:
    """Run one section here; write and return its record (ok, seconds, markdown, summary, data)."""
    sec = Section(name, out, smoke, regimes)
    start = time.perf_counter()
    record = {"section": name, "device": sec.device}
    try:
        SECTIONS[name][1](sec)
        record["ok"] = True
    except Exception:  # noqa: BLE001 - logged; the other sections go on
        sec.log(traceback.format_exc())
        sec.summary.append("FAILED: " + traceback.format_exc().strip().splitlines()[-1][:300])
        record["ok"] = False
    record |= {"seconds": time.perf_counter() - start, "markdown": "\n".join(sec.markdown),
               "summary": sec.summary, "data": sec.data}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"{name}.md").write_text(record["markdown"])
    return record


def run_isolated(name: str, out: Path, regimes: tuple[str, ...], log) -> dict:
    """Run one section in a child process under its time budget; on a crash or timeout, say so."""
    budget = SECTIONS[name][0]
    cmd = [sys.executable, __file__, str(out), "--section", name, "--tune-regimes", *regimes]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
        log.write(proc.stdout + proc.stderr)
        why = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as err:
        log.write(
            f"{(err.stdout or b'').decode(errors='replace')}{(err.stderr or b'').decode(errors='replace')}"
        )
        why = f"cut off after its {budget} s budget"
    log.flush()
    result = out / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    progress = out / f"{name}.progress"
    last = progress.read_text().strip().splitlines()[-3:] if progress.exists() else []
    return {"section": name, "ok": False, "seconds": time.perf_counter() - start, "markdown": "",
            "summary": [f"FAILED: {why}; last progress: {' | '.join(last)[-400:]}"], "data": {}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the tables, the log and the summary")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, all sections in this process")
    parser.add_argument("--tune-regimes", nargs="+", choices=REGIMES, default=list(REGIMES),
                        help="what the tune section times (default: all)")  # fmt: skip
    parser.add_argument("--decode-config", type=int, nargs=7, metavar="TILE",
                        help="the GEMV tiles an earlier run's tune chose (its summary prints them), used by this "
                             "run's sections as tune's choice is when tune runs first")  # fmt: skip
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    regimes = tuple(args.tune_regimes)
    if args.section:
        run_section(args.section, args.out, args.smoke, regimes)
        return
    records = []
    for name in SECTIONS:  # every section's, not only those run: a later section reads this run's tune only
        (args.out / f"{name}.json").unlink(missing_ok=True)
        (args.out / f"{name}.progress").unlink(missing_ok=True)
    if args.decode_config and "tune" not in args.sections:  # as if this run's tune had chosen it
        choice = ["gemv", *args.decode_config]
        (args.out / "tune.json").write_text(json.dumps({"section": "tune", "data": {"decode_choice": choice}}))
    with (args.out / "gpu.log").open("a") as log:
        for name in args.sections:
            record = (
                run_section(name, args.out, True, regimes)
                if args.smoke
                else run_isolated(name, args.out, regimes, log)
            )
            records.append(record)
            print(f"== {name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']:.0f} s", flush=True)
    env = next((r["data"] for r in records if r["section"] == "env"), {})
    machine = env.get("gpu") or ("CPU smoke run" if args.smoke else "unknown device")
    header = (
        f"\n## gpu.py, {datetime.date.today()}: {machine} (torch {env.get('torch', torch.__version__)}, "
        f"transformers {env.get('transformers', '?')}, triton {env.get('triton', '?')})\n\n"
    )
    (args.out / "results.md").write_text(header + "\n".join(r["markdown"] for r in records if r["markdown"]))
    summary = [f"# gpu.py summary: {machine}"] + [
        f"- {r['section']} ({'ok' if r['ok'] else 'FAILED'}, {r['seconds']:.0f} s): {'; '.join(r['summary'])}"
        for r in records
    ]
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
