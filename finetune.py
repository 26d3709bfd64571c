"""Instruction-tune a GPT-2 model (the code is minigpt.commands.finetune; also `minigpt finetune`)."""
import sys

from minigpt.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
