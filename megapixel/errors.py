"""Errors a user can cause; the CLI prints them as one line, without a traceback."""


class MegapixelError(Exception):
    """Base class for mistakes in a user's input: the message says what to fix."""


class ConfigError(MegapixelError):
    """A config file, preset or command-line override is wrong."""


class DataError(MegapixelError):
    """An image source, shard set or palette is missing or malformed."""


class CheckpointError(MegapixelError):
    """A checkpoint is missing, incomplete or does not fit the model."""


class NonFiniteError(MegapixelError):
    """Training kept producing non-finite losses or gradients and was stopped."""
