"""One exception family: anything a user can cause is a ParnnError with a one-line message.

The CLI prints these as `parnn: error: <message>` and exits non-zero; anything else is a bug.
"""


class ParnnError(Exception):
    """A problem the user can fix: bad input, bad flags, a damaged file."""


class DataError(ParnnError):
    """A dataset file is missing, damaged or not what it claims to be."""


class ConfigError(ParnnError, ValueError):
    """A parameter (or a combination of parameters) that is not allowed. Also a ValueError, so
    a Python caller catches bad settings as it would from scikit-learn or NumPy."""


class ModelFileError(ParnnError):
    """A model or checkpoint file that cannot be trusted or read."""


class DivergenceError(ParnnError):
    """Training produced NaN or infinity."""
