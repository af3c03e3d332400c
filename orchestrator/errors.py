"""What a user sees when something is wrong: one line, and never a password.

Anything the user can fix (a config, a path, a value) is raised as ``UserError`` with one line
stating the rule, the values and where. The CLI prints it as ``error: <message>`` and exits 2;
everything else is a bug and keeps its traceback. ``redact_text`` masks URL passwords in any
text that is printed or logged (storage and tracking URLs may carry them).
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """A mistake in user input: one clear line, exit code 2."""


def redact_text(text: str) -> str:
    """Any text with URL passwords (``scheme://user:pw@``, ``password=pw``) replaced by ``***``."""
    text = re.sub(r"(://[^/\s:@]*:)[^@\s/]*@", r"\1***@", text)
    return re.sub(r"(?i)((?:password|passwd|pwd)=)[^&\s]+", r"\1***", text)


def yaml_error(where: str, err: Exception, text: str | None = None) -> UserError:
    """One line for a YAML syntax error: the file, the line and column, the problem, the line itself.

    PyYAML's own message names ``"<unicode string>"`` and draws a caret under the line, which
    does not survive being put on one line.
    """
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return UserError(f"{where}: not valid YAML: {' '.join(str(problem).split())}")
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    started = f" ({context} at line {context_mark.line + 1})" if context and context_mark else ""
    lines = (text or "").splitlines()
    shown = f": {lines[mark.line].strip()!r}" if mark.line < len(lines) and lines[mark.line].strip() else ""
    return UserError(f"{where}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: "
                     f"{problem}{started}{shown}")
