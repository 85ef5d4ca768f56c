"""chlib's errors: each message names the file or value, the limit it broke and the remedy."""

from __future__ import annotations

__all__ = ["ChlibError", "ConfigError", "ManifestError", "AudioError", "FeatureError",
           "CheckpointError", "IndexMismatchError", "FolderLockedError"]


class ChlibError(Exception):
    """Base class of every error chlib raises on purpose."""


class ConfigError(ChlibError, ValueError):
    """A config file or value is unknown, missing or impossible."""


class ManifestError(ChlibError, ValueError):
    """A manifest line (dataset.txt, full.txt, split files) is malformed."""


class AudioError(ChlibError):
    """An audio file is missing, unreadable, silent, too short or invalid."""


class FeatureError(ChlibError):
    """A feature array is missing, corrupt or was computed with other settings."""


class CheckpointError(ChlibError):
    """A checkpoint is missing or does not match the model it is loaded into."""


class IndexMismatchError(ChlibError):
    """A reference index was built by another model or with other feature settings."""


class FolderLockedError(ChlibError):
    """Another running job holds the folder's lock (``chlib.core.io.folder_lock``)."""
