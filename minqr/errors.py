"""The one exception type users see for bad input (files, checkpoints, data, options).

The command line (minqr_cli) turns a MinqrError into a one-line message and a non-zero exit; anything else
is a bug in minqr and keeps its traceback. It subclasses ValueError so that library callers who
catch ValueError for bad arguments keep working.
"""


class MinqrError(ValueError):
    pass


class MinqrUsageError(MinqrError):
    """Options that cannot go together (e.g. --truth with --no-truth): the CLIs exit with status 2,
    as for any other misuse of the command line."""
