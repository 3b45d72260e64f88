"""Errors users can act on. The CLI prints their message on one line and exits non-zero."""


class PolarError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class UnsupportedModelError(PolarError, ValueError):
    """The model is not a decoder-only LM whose layers we can run as a program."""


class DataError(PolarError, ValueError):
    """A supervision or question file is malformed; the message names file, sample and field."""


class CheckpointError(PolarError, ValueError):
    """A predictor checkpoint is missing, malformed or belongs to a model of another depth."""


class ModelFileError(PolarError, ValueError):
    """A model, encoder or weight file is missing, damaged or in a format polar does not read."""


class UnsafeModelError(PolarError, ValueError):
    """Loading would run code that came with the files: a folder's own Python code without
    ``--trust_remote_code``, or pickle weights (unpickling can execute anything)."""


def check_text(text: str, where: str, error: type[DataError] = DataError) -> str:
    """Return ``text`` unchanged, or raise ``error`` if it is not valid Unicode.

    A lone surrogate (from a JSON escape such as ``"\\ud800"`` or from bytes that are not UTF-8
    on the command line) passes through Python's ``str`` untouched but breaks every tokenizer and
    every UTF-8 write much later, far from the file and sample it came from; so texts are checked
    where they are read, and the message says where.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(
            f"{where}: not valid Unicode text (unpaired surrogate U+{ord(text[err.start]):04X} at "
            f"character {err.start}); re-save it as UTF-8"
        ) from None
    return text
