"""The one exception type that means "the user's input is wrong".

The command line prints a `UserError` as a single line and exits non-zero; any other exception is a bug and
keeps its traceback. Both packages raise it (`pipeline` depends on `model`, never the reverse).
"""


class UserError(Exception):
    """Bad input (file, config, option) described in one line that names the culprit."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
