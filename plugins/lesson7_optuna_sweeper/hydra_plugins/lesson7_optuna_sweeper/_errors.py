"""The one error class of the sweeper: bad settings or a study it cannot use."""


class SweeperError(ValueError):
    """What is wrong and how to fix it, in one line; the sweeper prints it without a traceback and exits 2."""
