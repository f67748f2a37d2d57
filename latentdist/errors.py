"""The one exception type that means "the user's input is wrong".

The CLI turns it into a one-line message and exit status 2 (SPEC §5); library code raises it
for anything a user can fix (missing files, bad shapes, NaN values, nonsensical parameters).
"""


class UsageError(ValueError):
    """Bad user input: a file, flag or parameter that cannot be used as given."""
