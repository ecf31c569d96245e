"""Exceptions lungseg raises for input a user can fix.

The library raises these with a one-line message that names the file or folder
and the problem; only the command line turns them into exit codes. Every
exception class of the library lives here.
"""


class LungsegError(Exception):
    """Base class: a problem with the user's input or files, not a bug."""


class DicomError(LungsegError, ValueError):
    """A DICOM folder or file cannot be read as one consistent CT series."""


class LidcError(LungsegError, ValueError):
    """LIDC annotations cannot be matched to the given scan or folder."""


class CacheError(LungsegError, ValueError):
    """An HDF5 cache is missing, of another schema version, or malformed."""


class SplitError(LungsegError, ValueError):
    """A split file or a fold assignment cannot be read or made."""


class DeviceError(LungsegError, ValueError):
    """The requested compute device is unknown or not available."""


class TrainingError(LungsegError):
    """Training cannot go on (a non-finite loss, an empty split, a mismatched checkpoint)."""


class CheckpointError(TrainingError, ValueError):
    """A checkpoint cannot be loaded, is of another kind, or does not fit the data or the other model."""
