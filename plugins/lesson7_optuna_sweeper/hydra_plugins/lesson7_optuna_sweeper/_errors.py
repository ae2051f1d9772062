"""The sweeper's error classes (a module the plugin scan skips: one class object each, whoever imports it)."""


class SweeperError(ValueError):
    """What is wrong and how to fix it, in one line; the sweeper prints it without a traceback and exits 2."""


class JobLost(Exception):
    """A trial's SLURM job ended without a result; `cancelled`: by scancel."""

    def __init__(self, reason: str, cancelled: bool) -> None:
        super().__init__(reason)
        self.cancelled = cancelled
