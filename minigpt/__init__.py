"""minigpt: GPT-2 pretraining, LoRA instruction tuning and chat in pure PyTorch."""
from .data.tokenizer import get_tokenizer
from .model.config import GPTConfig
from .model.gpt import GPT, lm_loss

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "get_tokenizer", "lm_loss", "__version__"]
