"""One exception type for every user-facing error, so the CLI can print it as one clear line."""


class ActlabError(Exception):
    """A problem with the user's input or files; the message says what is wrong and how to fix it."""
