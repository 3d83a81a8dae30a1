"""Errors of constraint compilation."""


class ConstraintError(ValueError):
    """A constraint that is malformed, unsupported, or matches nothing the model's vocabulary can write."""
