"""The error every data problem raises: one line naming the file and the fix."""


class DataError(ValueError):
    """A dataset problem the user can fix: a missing mask, an unreadable file, ...

    The message is one line that names the file, says what is wrong and what to do
    (often: fix or remove the file, or pass ``--skip-bad``). The command-line tools
    print it without a traceback and exit with a non-zero status.
    """
