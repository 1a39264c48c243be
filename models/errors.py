"""Errors raised by the model runtime.

Every error here says what is wrong and, where it can, what to do about it::

    ModelError                      root of this layer
    ├── ModelConfigError            config.json / GGUF metadata missing fields or bad values
    │   └── UnsupportedArchitectureError   a model family we do not implement
    ├── CheckpointError             corrupt, truncated or incomplete weight files
    ├── TokenizerError              tokenizer files missing or unusable, chat template errors
    └── ContextLengthError          a prompt or cache does not fit the model's context
"""


class ModelError(Exception):
    """Root of the model runtime's errors."""


class ModelConfigError(ModelError):
    """A model configuration is missing fields or holds values we cannot use."""


class UnsupportedArchitectureError(ModelConfigError):
    """The model belongs to a family this runtime does not implement."""


class CheckpointError(ModelError):
    """Weight files are corrupt, truncated, or lack tensors the model needs."""


class TokenizerError(ModelError):
    """The tokenizer or its chat template cannot be built or rendered."""


class ContextLengthError(ModelError):
    """Tokens do not fit the model's context or the session's KV cache."""
