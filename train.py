"""Pretrain a GPT-2 model (the code is minigpt.commands.train; also `minigpt train`)."""
import sys

from minigpt.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
