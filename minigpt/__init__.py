"""minigpt: GPT-2 pretraining, LoRA instruction tuning and chat in pure PyTorch."""
from .config import GPTConfig
from .model import GPT, lm_loss
from .tokenizer import get_tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "get_tokenizer", "lm_loss", "__version__"]
