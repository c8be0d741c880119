"""The errors soflow raises for bad input.

Every one is a :class:`SoflowError`; the command line prints it as one line on stderr and exits with
status 2.  Any other exception out of soflow is a fault in soflow and keeps its traceback.
"""

from __future__ import annotations


class SoflowError(Exception):
    """A bad input or an unusable file.  The message is one line that names the culprit (a setting,
    an argument, a file) and says what to do about it."""


class ConfigError(SoflowError, ValueError):
    """A bad setting or command-line argument; the message names the key or the option."""


class DataError(SoflowError, ValueError):
    """A missing or malformed dataset; the message names the file and what is expected."""


class CheckpointError(SoflowError, ValueError):
    """A run checkpoint or reference checkpoint that cannot be read or does not fit the network."""


class EvalError(SoflowError, ValueError):
    """Unusable evaluation input (image folder, sample or statistics file, weights file).
    The message is one line that names the file."""


class TrainingError(SoflowError, RuntimeError):
    """A run that cannot go on (non-finite loss); the message says where the last good state is."""


class UnreadableFile(SoflowError):
    """A file that soflow will not or cannot read. ``holds_objects`` is True when the restricted
    unpickler refused it: a pickle that names Python objects beyond tensors and plain values
    (possibly code) or uses what that unpickler does not read. The message is a short reason,
    without the file name, for the caller's one-line error."""

    def __init__(self, reason: str, holds_objects: bool = False):
        super().__init__(reason)
        self.holds_objects = holds_objects

    def __reduce__(self):  # pickles (e.g. between ranks) with both arguments
        return type(self), (str(self), self.holds_objects)
