"""One exception type for problems the user can fix; the CLI prints it and exits non-zero."""


class StreamResizeError(Exception):
    """Bad input or state, with a message that names the file and what is wrong."""
