"""The one exception type that prunekit raises for bad input."""


class PruneError(ValueError):
    """Bad input or a numerical failure, with a message that names what is at fault."""
