"""The training side's error for runs that cannot start or go on."""


class RunError(RuntimeError):
    """A run that cannot start or go on (bad output folder, missing or damaged checkpoint,
    no GPU, a full disk, ...): one line a user can act on."""
