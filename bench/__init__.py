"""Benchmarks of speechjax against PyTorch + transformers + peft (`make bench`)."""
