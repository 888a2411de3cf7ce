"""Quantization algorithms: round-to-nearest, GPTQ, decoupleQ, block-wise minimization."""
