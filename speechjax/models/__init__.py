"""Flax Linen models: audio encoder, projectors, decoder LLMs, LoRA, speech LLM."""
