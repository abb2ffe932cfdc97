"""sdlora's errors: one base class, `SdloraError`, which the `sdlora` command and the app catch and show as one line.

Every error a user causes and can fix (a config key, a dataset file, a model path, a LoRA file, a setting) derives
from it, and also from the built-in error it is (ValueError, OSError, ...), so that code catching those still does.
Its message is complete: it names the file or key and says what to do. Anything else that reaches the command line
is a bug and keeps its traceback.
"""

from __future__ import annotations


class SdloraError(Exception):
    """A problem the user can fix; the message names the file or key and the fix, on one line."""

    exit_code = 1  # what the `sdlora` command exits with


class ConfigError(SdloraError, ValueError):
    """A config file or override is invalid; the message lists every problem, naming each key."""

    exit_code = 2  # a usage error, as argparse's own


class GenerationError(SdloraError, ValueError):
    """Generation settings that cannot work (size, steps, sampler, count, no prompt, no model); says which and why."""

    exit_code = 2


class ClipError(SdloraError, ValueError):
    """The CLIP model for similarity scores cannot be used; the message names the folder and what to do."""

    exit_code = 2


class DatasetError(SdloraError, ValueError):
    """The dataset cannot be used; the message names the file or folder and the fix."""


class ModelError(SdloraError, ValueError):
    """The base model cannot be used; the message names the path and what to do."""


class LoraFileError(SdloraError, ValueError):
    """A LoRA file or state dict cannot be read or mapped onto the model; the message says what and where."""


class PlanError(SdloraError, ValueError):
    """No setting fits the memory budget, or the budget is unreadable; the message gives the smallest estimate."""


class TrainingError(SdloraError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class PathError(SdloraError, ValueError):
    """A name chosen in the app points outside the folder it must come from."""


class DiskSpaceError(SdloraError, OSError):
    """Not enough free disk space to write a file; nothing was written or replaced."""


class MissingFileError(SdloraError, FileNotFoundError):
    """A file or folder the user named (a run folder, a checkpoint, a LoRA file) does not exist or lacks a part."""


# What the command and the app show as one line: our errors, and a missing file, whose message names the path.
USER_ERRORS = (SdloraError, FileNotFoundError)
