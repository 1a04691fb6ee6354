"""User errors: bad input that must be reported in one paragraph, without a traceback."""


class UserError(Exception):
    """Bad input (options, data, model, checkpoint). Entry points print it and exit with status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): library
    errors often carry pages of context, and our errors are one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
