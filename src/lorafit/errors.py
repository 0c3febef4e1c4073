"""The one base class of the errors a user can fix: bad config, bad data, a missing model."""


class LorafitError(Exception):
    """A problem in the user's input or set-up; its message says what, where and how to fix it.

    Entry points print these as one line instead of a traceback.
    """
