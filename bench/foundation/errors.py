"""The one exception type a user sees as a single line (the CLI prints it and exits non-zero)."""


class RobustMatrixError(Exception):
    """Bad input or an unusable environment; the message names the problem and, where it can, the fix."""
