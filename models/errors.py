"""The base of every error a user can fix (bad data, a missing model, a refused export).

The CLI prints these as one line; anything else is a bug and keeps its traceback.
"""


class DynfuseError(Exception):
    pass
