"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class LoopcoderError(Exception):
    """Bad input from the user (a path, a flag, a file); the message says what and where."""
