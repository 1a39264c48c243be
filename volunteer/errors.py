"""Errors of the volunteer layer (daemon, CLI, model store).

Each carries one line a person can act on::

    VolunteerError                 root of this layer
    ├── SettingsError              bad config file, env var or flag
    └── ModelStoreError            fetching or caching a model failed
        ├── UnknownModelError      a name that is neither registered, a repo id nor a path
        ├── FetchError             the network or a package index failed us
        ├── IntegrityError         a download or cached file does not match its sha256
        └── DiskFullError          no space left while writing into the cache
"""


class VolunteerError(Exception):
    """Root of the volunteer layer's errors."""


class SettingsError(VolunteerError):
    """A configuration value is missing or invalid."""


class ModelStoreError(VolunteerError):
    """A model could not be fetched, imported or verified."""


class UnknownModelError(ModelStoreError):
    """The model name is neither registered, a Hugging Face repo id, nor a local path."""


class FetchError(ModelStoreError):
    """Downloading failed: no network, an unreachable index, or a missing file."""


class IntegrityError(ModelStoreError):
    """A file's sha256 differs from the one we pinned or recorded."""


class DiskFullError(ModelStoreError):
    """The disk filled up while writing into the model cache."""
