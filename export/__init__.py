"""ONNX export, quantization, bundles, parity and benchmarks (needs the [export] extra)."""
