"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits non-zero; anything else
escaping the API is a bug and keeps its traceback.
"""


class LobsError(Exception):
    """A user-facing error whose message names the file, tensor or layer at fault."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line: its first paragraph (checker and onnxruntime messages
    go on with node dumps and stack traces), whitespace joined, cut to a length."""
    paragraph = str(e).strip().split("\n\n")[0]
    text = " ".join(paragraph.split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
