"""User errors: bad input that must be reported in one paragraph, without a traceback."""


class UserError(Exception):
    """Bad input (options, data, model, checkpoint). Entry points print it and exit with status 2."""
