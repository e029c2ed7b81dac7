"""User-facing errors. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, flag, config, checkpoint): message is one line with the fix."""
