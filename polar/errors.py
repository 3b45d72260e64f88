"""Errors users can act on. The CLI prints their message on one line and exits non-zero."""


class PolarError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class UnsupportedModelError(PolarError, ValueError):
    """The model is not a decoder-only LM whose layers we can run as a program."""


class DataError(PolarError, ValueError):
    """A supervision or question file is malformed; the message names file, sample and field."""


class CheckpointError(PolarError, ValueError):
    """A predictor checkpoint is missing, malformed or belongs to a model of another depth."""
