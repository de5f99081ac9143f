"""Errors a user can act on. The CLI prints their message, never a traceback."""


class CycleQDError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(CycleQDError):
    """The campaign config is missing, unreadable or invalid."""


class ModelMismatchError(CycleQDError):
    """Base and experts do not share one architecture (names, shapes, dtypes)."""


class MissingTensorError(CycleQDError):
    """A model folder lacks a tensor the recipe needs."""


class NonFiniteWeightsError(CycleQDError):
    """A materialised model holds NaN or Inf; it must never be archived."""


class GenomeError(CycleQDError):
    """A genome refers to something unknown or cannot be built."""
