"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class SslmedError(Exception):
    """A mistake in the user's input, config or data that the user can fix."""


class ConfigError(SslmedError):
    """Unknown key, wrong type or invalid value in a config."""


class VolumeError(SslmedError):
    """A volume file that cannot be read or fails validation."""


class DataError(SslmedError):
    """A missing, empty or corrupt packed dataset."""


class CheckpointError(SslmedError):
    """A missing or incompatible checkpoint or exported encoder."""
