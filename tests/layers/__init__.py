"""Tests of onnx_lobs.layers: one module per adapter module, and one contract over all of them."""
