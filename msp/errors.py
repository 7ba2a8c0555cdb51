"""msp's own error type: bad input or a run that cannot work as configured, with a message that names the fix.

Every error class msp raises for something the user can fix subclasses :class:`MspError`; the command line
prints exactly these as one line (``msp: error: ...``) and lets anything else (a real bug) show its traceback.
It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""
from __future__ import annotations


class MspError(ValueError):
    """A user-fixable problem; the message says what was given, what is allowed and how to fix it."""


__all__ = ["MspError"]
