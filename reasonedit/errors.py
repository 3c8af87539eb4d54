"""Errors the command line turns into a message and an exit code."""


class NotBuiltError(RuntimeError):
    """A part of the framework that does not exist yet; says which issue builds it."""

    def __init__(self, what: str, issue: int):
        super().__init__(f"{what} is not built yet (planned in issue #{issue}); nothing was run")
        self.issue = issue


class RemoteServiceError(RuntimeError):
    """A remote service (editor, thinker, judge) could not answer after every retry; names the URL(s)."""
