"""The one exception type the CLI turns into a clean message and exit code 2.

Every module raises a subclass of `UserError` for problems the user can fix (a bad preset, a missing dataset, a path
that is not a run, FID weights that cannot be found). Its message is one line per problem, naming the file or field
and what to do. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment: reported as `error: <message>`, exit code 2."""


class MetricsError(UserError):
    """Base of every metrics error (FID weights, statistics, references); one line saying what is wrong and what to do."""
