"""The one exception type that means "the user's input is wrong".

The command line prints a `UserError` as a single line and exits non-zero; any other exception is a bug and
keeps its traceback. Both packages raise it (`pipeline` depends on `model`, never the reverse).
"""


class UserError(Exception):
    """Bad input (file, config, option) described in one line that names the culprit."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the work done so far is saved, and the message says where and how to resume. The
    command line prints it and exits 130."""


def reason(exc: BaseException) -> str:
    """One line saying why `exc` happened, for errors from Ray: the worker's own exception, which Ray keeps as
    `cause` (task errors) or only as traceback text whose last line names it (an actor that died in its
    constructor); else the first line of the message."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    text = str(exc).strip()
    if type(exc).__module__.startswith("ray.") and "\n" in text:
        return text.splitlines()[-1].strip()
    return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
