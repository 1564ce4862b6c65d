"""The one base class of the toolkit's user-facing faults.

Every fault a user can fix (a missing or corrupt file, a wrong key, shape or value, an unwritable
output) is raised as a subclass of :class:`ToolkitError` whose message is one line naming the file or
flag and the problem. The scripts' entry point (:func:`network.cli.run`) reports any of them as
``<script>: error: <message>`` with exit status 2 and no traceback; library callers catch them as usual.
"""


class ToolkitError(Exception):
    """A fault the user can fix; ``str(error)`` is one line naming the file or flag and the problem."""


class RunError(ToolkitError):
    """A training, evaluation or registration run that cannot start or go on as asked."""


__all__ = ["ToolkitError", "RunError"]
