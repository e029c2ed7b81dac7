"""User-facing errors. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, flag, config, checkpoint): message is one line with the fix."""


class TrainingAborted(UserError):
    """Training stopped on purpose (e.g. too many non-finite steps); exit status 1."""

    exit_code = 1
