"""One exception type per layer, each with a message a judge can act on.

The CLI maps each to its own exit code (see `cli.EXIT_CODES`); library code never calls `sys.exit`.
"""


class BirbalError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(BirbalError):
    """A recipe file, profile or override is missing or invalid."""


class RunDirError(BirbalError):
    """The run directory cannot be used (not writable, corrupt record, another run's files)."""


class DataError(BirbalError):
    """A data source is missing, corrupt, of the wrong schema, or does not match its pinned hash."""


class ModelError(BirbalError):
    """A model or tokenizer cannot be loaded or built."""


class TrainError(BirbalError):
    """Training cannot start or continue (bad checkpoint, no data, memory cap impossible)."""


class ExportError(BirbalError):
    """The adapter does not match the recipe, or merging failed its checks."""


class ServeError(BirbalError):
    """The submission server cannot start."""


class EvaluateError(BirbalError):
    """The evaluation cannot run (server down, HELM missing, no data)."""
