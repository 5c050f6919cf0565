"""The package's error types: the bottom floor, imported by every module and importing none."""


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says which file and how to fix it."""


def one_line(message) -> str:
    """A message as one line: what the scripts print after ``error:``."""
    return " ".join(str(message).split())
