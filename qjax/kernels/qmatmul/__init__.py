"""Quantized matmul: reference, kernels and dispatch."""
