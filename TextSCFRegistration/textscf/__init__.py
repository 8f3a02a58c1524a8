"""TextSCF: deformable registration with spatially covariant filters driven by text prompts.

The engine of the TextSCF 3D Slicer extension. It has no Slicer dependency.
"""

__version__ = "0.1.0"

from textscf.errors import (  # noqa: F401
    CancelledError,
    CheckpointError,
    InputError,
    OutputError,
    PromptError,
    TextSCFError,
)
