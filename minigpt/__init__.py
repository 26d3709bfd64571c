"""minigpt: GPT-2 pretraining, parameter-efficient fine-tuning and chat in pure PyTorch.

The top-level package is the stable surface; the subpackages name the parts:
    model/      GPTConfig and presets, the GPT module, quantized (NF4/int8) linears
    weights/    checkpoints on disk: load/save, HF and OpenAI key maps, the TF bundle reader, hub cache, GGUF
    methods/    fine-tuning methods: LoRA/DoRA, IA3, prefix/prompt tuning, bottleneck adapters (PEFT files)
    data/       tokenizer, pretraining corpus, instruction records, prompt templates, collator
    training/   TrainConfig and the one Trainer, time budget, optimizers, losses, run folders, evaluation
    inference/  sampling, the decoding loop, decode-time weights, serving engine, chat, the HTTP server
    commands/   the command-line programs (minigpt train|finetune|chat|serve|export|info)
"""
from .data.corpus import TokenDataset
from .data.instruct import InstructionDataset
from .data.tokenizer import get_tokenizer
from .inference.decode_weights import prepare_for_decoding
from .methods import load_adapter, save_adapter
from .methods.lora import add_lora, merge_lora, unmerge_lora
from .model.config import GPTConfig
from .model.gpt import GPT, lm_loss
from .model.quant import quantize_model
from .weights.gguf import export_gguf

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "get_tokenizer", "lm_loss", "add_lora", "merge_lora", "unmerge_lora", "save_adapter",
           "load_adapter", "export_gguf", "prepare_for_decoding", "quantize_model", "TokenDataset",
           "InstructionDataset", "__version__"]
