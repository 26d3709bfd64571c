"""Weights on disk: checkpoint load/save, HF/OpenAI key maps, the TF bundle reader, the hub cache, GGUF."""
