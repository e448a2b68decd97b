"""User-facing errors. The CLI prints any MarjaxError as one line, without a traceback."""


class MarjaxError(ValueError):
    """Bad input at an API boundary: the message names the argument, expected and received."""


class ConfigError(MarjaxError):
    """A config field has a value that cannot work; the message names the field."""


class ModelNotFoundError(MarjaxError, FileNotFoundError):
    """A model name or path that resolves to nothing; the message says how to get it."""


class CheckpointError(MarjaxError):
    """A corrupt, truncated or mismatched weights/checkpoint file."""


class DataError(MarjaxError):
    """Unreadable or malformed training/eval data (the message names file and line)."""
