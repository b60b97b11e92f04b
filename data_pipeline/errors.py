"""The error every data problem raises: one line naming the file and the fix."""

import zipfile
import zlib

# What reading a damaged zip (or gzip) archive raises, besides OSError: a download cut
# short, a disk error.
DAMAGED_ARCHIVE = (zipfile.BadZipFile, zlib.error, EOFError)


class DataError(ValueError):
    """A dataset problem the user can fix: a missing mask, an unreadable file, ...

    The message is one line that names the file, says what is wrong and what to do
    (often: fix or remove the file, or pass ``--skip-bad``). The command-line tools
    print it without a traceback and exit with a non-zero status.
    """


class SettingError(Exception):
    """A setting of the whole process is wrong (an environment variable): one line
    naming it and the fix. Not a DataError, nor a ValueError or OSError, so that no
    handler of one file's problems takes it for that file's fault (and ``--skip-bad``
    never skips every file for it)."""
