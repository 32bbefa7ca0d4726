"""The one exception type for user mistakes: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unwritable folder). Never a bug."""
