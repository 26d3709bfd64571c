"""Serve a model over an OpenAI-compatible API (the code is minigpt.commands.serve; also `minigpt serve`)."""
import sys

from minigpt.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
