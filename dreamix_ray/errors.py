"""The one base class of errors a user can cause: the CLI prints them in one line and exits 2."""


class UserError(ValueError):
    """Bad input or setting; the message names what was wrong and what to do."""
