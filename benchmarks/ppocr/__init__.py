"""Helpers of benchmarks/bench_quantize_ppocr.py: the PP-OCRv4 recogniser, rendered text
lines, and the accuracy metrics (CER, fidelity). Not part of graphopt; not run by CI."""
