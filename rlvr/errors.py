"""The one exception type for bad input: its message names the input and the fix, and entry points print it."""


class InputError(ValueError):
    """Input that cannot be used as given (a parameter, file, model name, URI); the message says how to fix it."""
