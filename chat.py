"""Chat with a GPT-2 model (the code is minigpt.commands.chat; also `minigpt chat`)."""
import sys

from minigpt.commands.chat import main

if __name__ == "__main__":
    sys.exit(main())
