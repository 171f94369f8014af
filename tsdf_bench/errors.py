"""Exceptions with messages that name the thing at fault and the fix."""
import difflib


class TsdfBenchError(Exception):
    """Base class of every error tsdf-bench raises on purpose."""


class PluginError(TsdfBenchError):
    """A plugin failed to load, raised in a hook, or registered a bad or duplicate record."""


class UnknownNameError(TsdfBenchError, KeyError):
    """A name in a config or on the command line matches no registered plugin."""

    def __init__(self, kind, name, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        close = difflib.get_close_matches(name, self.valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(
            f"unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(self.valid) or '(none registered)'}."
        )

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class ConfigError(TsdfBenchError):
    """A run config is missing a key, has a typo, or a value of the wrong type."""


class ImageError(TsdfBenchError):
    """An image file is corrupt, truncated, empty, not an image, or too large."""

    def __init__(self, path, reason):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(TsdfBenchError):
    """A checkpoint is missing, of the wrong model, or has mismatching keys or shapes."""


def closest(name, valid):
    """The closest valid name to ``name``, or None."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return match[0] if match else None
