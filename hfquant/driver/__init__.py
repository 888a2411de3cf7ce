"""The quantization driver: from a loaded full-precision model to one whose linears are quantized.

:mod:`~hfquant.driver.sequential` is the top-down loop; :mod:`~hfquant.driver.blocks` reaches the
decoder blocks (capture, onload, full-precision pass); :mod:`~hfquant.driver.solve` applies the
config's solver to one linear; :mod:`~hfquant.driver.kept` chooses the kept 16-bit weights;
:mod:`~hfquant.driver.workdir` saves finished blocks so a rerun resumes.
"""

from hfquant.driver.sequential import BlockReport, QuantizationReport, quantize_model

__all__ = ["BlockReport", "QuantizationReport", "quantize_model"]
