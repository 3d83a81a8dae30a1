"""Errors every reader of a user's checkpoint raises (a leaf module: the readers of every layout import it)."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message names the file and tensor at fault."""
