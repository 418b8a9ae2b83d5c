"""Codecs for what stages exchange: identity (fp32/bf16), direct quantization, AQ-SGD delta."""
