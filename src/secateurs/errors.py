"""The one exception type users see for bad input; its message always names the fix."""


class SecateursError(Exception):
    """Bad input or a missing resource, reported before expensive work where possible."""
