"""The one exception type users see for bad input (files, checkpoints, data, options).

The CLIs in tools/ turn a MinqrError into a one-line message and a non-zero exit; anything else
is a bug in minqr and keeps its traceback. It subclasses ValueError so that library callers who
catch ValueError for bad arguments keep working.
"""


class MinqrError(ValueError):
    pass
