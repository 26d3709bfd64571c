"""The model: GPTConfig and presets, the GPT module, quantized (NF4/int8) linears."""
