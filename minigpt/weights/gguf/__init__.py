"""GGUF for llama.cpp: export any minigpt GPT-2 (base, fine-tuned, LoRA merged), LoRA adapters as
llama.cpp LoRA GGUFs, and import GGUF GPT-2 files.

    from minigpt.weights.gguf import export_gguf, export_lora_gguf, read_gguf
    export_gguf(model, "model.gguf", dtype="f16", template="alpaca")   # f32 | f16 | bf16 | q8_0
    export_lora_gguf(lora_model, "adapter.gguf")      # llama-cli -m base.gguf --lora adapter.gguf
    GPT.from_pretrained("model.gguf")                 # import (f32/f16/bf16/q8_0, dequantized)

The parts: .format (the GGUF v3 writer and reader, q8_0), .vocab (llama.cpp's tensor names, the
tokenizer metadata, the Jinja chat template), .load (load_gguf_checkpoint, what
minigpt.weights.checkpoint reads .gguf files with; it needs nothing of minigpt.methods) and .export
(export_gguf, export_lora_gguf; the weights come from minigpt.methods).
"""
from .export import export_gguf, export_lora_gguf
from .format import DTYPES, GGUFFile, GGUFTensor, TensorToWrite, dequantize_q8_0, quantize_q8_0, read_gguf, write_gguf
from .load import load_gguf_checkpoint
from .vocab import chat_template_jinja, gguf_name, gpt2_vocab, minigpt_name, tokenizer_metadata

__all__ = ["DTYPES", "GGUFFile", "GGUFTensor", "TensorToWrite", "chat_template_jinja", "export_gguf",
           "export_lora_gguf", "gpt2_vocab", "gguf_name", "load_gguf_checkpoint", "minigpt_name", "quantize_q8_0",
           "dequantize_q8_0", "read_gguf", "tokenizer_metadata", "write_gguf"]
