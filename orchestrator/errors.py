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
