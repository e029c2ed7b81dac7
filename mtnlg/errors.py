"""User-facing errors. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, flag, config, checkpoint): message is one line with the fix.

    Each rank that raises one prints it, unless ``on_every_rank``: then every rank of the job raises the
    same error (a config mistake, a check the ranks agreed on) and only global rank 0 prints it."""

    on_every_rank = False


class JobError(UserError):
    """A user error that every rank of the job raises identically; printed once, by global rank 0."""

    on_every_rank = True


class TrainingAborted(UserError):
    """Training stopped on purpose (e.g. too many non-finite steps); exit status 1."""

    exit_code = 1


class LostContact(TrainingAborted):
    """A collective failed because another rank died or hung. Every surviving rank sees it; the first rank of each
    host to see it prints it, so a lost host is named once per surviving host."""
