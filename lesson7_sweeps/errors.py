"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""


class ConfigError(UserError):
    """A config value, key or group option is wrong."""


class DataError(UserError):
    """Data is missing, unreadable or too small."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: damaged, or holding what this code never writes."""
