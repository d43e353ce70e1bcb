"""The one exception type for mistakes a user can fix."""


class PerdiagError(Exception):
    """A problem with the user's input (file, flag, shape) that they can fix.

    The CLI catches it once, prints the message on one line and exits with code 2.
    Library callers get it as an ordinary exception; it subclasses ``Exception``
    (not ``ValueError``) so that programming errors are never mistaken for it.
    """


class InputValueError(PerdiagError, ValueError):
    """Bad values handed to a math function (empty, non-finite, wrong rank)."""
