"""hfquant: 2-bit quantization of LLMs for Hugging Face Transformers.

``import hfquant`` registers :class:`HfQuantConfig` and its quantizer with transformers, so
``from_pretrained(..., quantization_config=HfQuantConfig(...))`` quantizes at load and
``from_pretrained(saved_dir)`` reloads a quantized checkpoint.
"""

__version__ = "0.1.0"

from transformers.quantizers.auto import (  # noqa: E402
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from hfquant.config import QUANT_METHOD, HfQuantConfig  # noqa: E402
from hfquant.nn import DecoupledLinear, PowerOfTwoLinear, SplitLinear  # noqa: E402
from hfquant.quantizer import HfQuantQuantizer  # noqa: E402

# Registration is idempotent so that re-imports (importlib.reload, test runners) do not fail.
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfQuantConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(HfQuantConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfQuantQuantizer:
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantizer(QUANT_METHOD)(HfQuantQuantizer)

__all__ = [
    "DecoupledLinear",
    "HfQuantConfig",
    "HfQuantQuantizer",
    "PowerOfTwoLinear",
    "SplitLinear",
    "__version__",
]
