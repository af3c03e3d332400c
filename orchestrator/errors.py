"""The one exception type a user sees.

Anything the user can fix (a config, a path, a value) is raised as ``UserError`` with one line
stating the rule, the values and where. The CLI prints it as ``error: <message>`` and exits 2;
everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in user input: one clear line, exit code 2."""
