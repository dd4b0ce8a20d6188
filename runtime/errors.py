"""Errors the runtime raises for bad input; the CLI turns them into one line and exit code 2."""


class FewShotInputError(ValueError):
    """An input (image, array, label, bundle, store) that cannot be used, with a one-line reason."""
