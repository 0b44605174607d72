"""Exceptions that the CLI turns into one-line messages instead of tracebacks."""


class UGEError(Exception):
    """Base class of every error a user can cause (bad input, bad config, tampered files)."""


class DataError(UGEError, ValueError):
    """A data set could not be loaded or is malformed; the message names the file or field."""


class ConfigError(UGEError, ValueError):
    """A configuration value or model name is invalid."""


class VerificationError(UGEError):
    """A published set failed verification (budget, labels, order or hashes)."""
