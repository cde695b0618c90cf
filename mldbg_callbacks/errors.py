"""Exceptions raised by mldbg-callbacks. Every message names the fix."""


class MLDebuggerError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidNameError(MLDebuggerError, ValueError):
    """A model, version, dataset or result name that cannot be used as a path component."""


class TraceInputError(MLDebuggerError, ValueError):
    """A batch handed to a tracer does not fit the task (shapes, labels, values)."""


class TraceWriteError(MLDebuggerError, OSError):
    """Traces could not be made durable (disk full, read-only directory, ...)."""


class ResultWriteError(MLDebuggerError, OSError):
    """An evaluation finished but its result could not be saved in the store (read-only, full)."""


class EpochNotRecordedError(MLDebuggerError, KeyError):
    """wait_for_save() was asked for an epoch that no record() call used."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class NoTracesError(MLDebuggerError, LookupError):
    """An evaluation was asked for a model/version/epoch that has no committed traces."""



class NoReferenceError(MLDebuggerError, LookupError):
    """Data traced without labels cannot be evaluated: no labelled reference set to learn error_proba on."""


class SelectionError(MLDebuggerError, ValueError):
    """``Result.select()`` cannot apply a strategy to the chosen pool (no features, no labels, ...)."""
