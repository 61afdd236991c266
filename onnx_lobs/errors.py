"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits non-zero; anything else
escaping the API is a bug and keeps its traceback.
"""


class LobsError(Exception):
    """A user-facing error whose message names the file, tensor or layer at fault."""
