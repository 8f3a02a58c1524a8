"""Errors raised for bad input. Each message names the problem and how to fix it."""


class TextSCFError(ValueError):
    """Base class of every user-facing TextSCF error."""


class InputError(TextSCFError):
    """An input image, label map or transform is missing, unreadable or inconsistent."""


class PromptError(TextSCFError):
    """The prompts (region names, template) are empty, duplicated or do not fit the model."""


class CheckpointError(TextSCFError):
    """A checkpoint is missing, corrupted, truncated or does not match the requested setup."""


class OutputError(TextSCFError):
    """An output location cannot be written, or would overwrite existing files."""


class CancelledError(TextSCFError):
    """The user cancelled a running registration."""
