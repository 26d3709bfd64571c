"""The library's exceptions: one base class, so a command line prints any of them as one line.

    MinigptError                  anything the user can fix; the message is one line
    ├── ConfigError (ValueError)  an invalid argument, flag or config field (names it)
    │   └── ChatError             a chat problem (bad setting, prompt cannot fit, no model to load)
    ├── CheckpointError           a model file or folder that cannot be found, read or matched
    │   └── AdapterError (ValueError)  the same for an adapter folder
    ├── DataError (ValueError)    a dataset that cannot be read (names the file and line)
    ├── RunDirError               an output folder that may not be used (would lose data)
    └── TrainingStopped           training could not go on (e.g. repeated non-finite loss)

Errors of the machine itself (disk full, no permission) stay OSError.
"""
from __future__ import annotations

__all__ = ["MinigptError", "ConfigError", "ChatError", "CheckpointError", "AdapterError", "DataError",
           "RunDirError", "TrainingStopped"]


class MinigptError(Exception):
    """Base of every user-facing minigpt error (one-line message)."""


class ConfigError(MinigptError, ValueError):
    """An invalid argument, command-line flag or config field; the message names it."""


class ChatError(ConfigError):
    """A user-facing chat problem (bad setting, prompt cannot fit, no model to load): one-line message."""


class CheckpointError(MinigptError):
    """A checkpoint could not be found, read, verified or matched to a model."""


class AdapterError(CheckpointError, ValueError):
    """An adapter folder that cannot be read or does not fit the model."""


class DataError(MinigptError, ValueError):
    """Malformed or unusable training data; the message names the file and, where it can, the line."""


class RunDirError(MinigptError):
    """An output folder that a run may not use as asked (it holds something that would be lost)."""


class TrainingStopped(MinigptError):
    """Training could not continue (e.g. repeated non-finite loss); the message says why."""
