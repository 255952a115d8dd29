"""Typed exceptions. Code raises these; only the CLI turns them into one-line messages."""


class PipelineError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(PipelineError):
    """A config file, key or value is invalid."""


class CacheError(PipelineError):
    """A cache on disk is missing, incomplete, corrupt or does not match."""


class FingerprintMismatch(CacheError):
    """An existing cache was built from other inputs than the ones asked for now."""


class TeacherError(PipelineError):
    """The teacher model cannot be loaded or used as the pipeline needs."""


class DataError(PipelineError):
    """The input dataset is missing, empty or unusable."""


class NotImplementedYet(PipelineError):
    """A command of the contract that a later issue fills in."""


class LockHeld(PipelineError):
    """Another process holds the lock of a directory this command would write."""


class NonFiniteError(CacheError):
    """The teacher produced NaN/Inf; the shard holding it is not committed."""
