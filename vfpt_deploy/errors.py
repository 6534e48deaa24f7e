"""The library's one exception root and its kinds. The CLI turns any VFPTError into one line on stderr
and a non-zero exit, in one place; library users can catch the root or one kind.

Torch-free: the runtime (onnxruntime / TensorRT serving) raises these too.
"""


class VFPTError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""

    exit_code = 1


class UsageError(VFPTError, ValueError):
    """An option or argument value is out of range, not finite, or inconsistent with another."""

    exit_code = 2


class InputError(VFPTError):
    """An input file (checkpoint, weights, image, data folder) is missing, unreadable or malformed."""


class ImageError(InputError, ValueError):
    """A file that cannot be used as an image (message names the file)."""


class ArtifactError(InputError):
    """An exported artifact (ONNX, engine, sidecar) or its metadata is unusable by the runtime."""


class OutputError(VFPTError):
    """An output path is refused: it names an input, a folder, a wrong suffix, or cannot be written."""


class VerificationError(VFPTError):
    """An artifact is outside its stated tolerances, or its outputs are not finite."""


class RuntimeSetupError(VFPTError):
    """The runtime cannot run as asked here (provider, GPU, library missing); the message names the fix."""


class Unavailable(RuntimeSetupError):
    """A backend that cannot run on this machine; the message is the reason shown to the user."""
