"""The one error type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""

    def __init__(self, problem: str, fix: str | None = None):
        msg = problem if fix is None else f"{problem} — {fix}"
        super().__init__(msg.replace("\n", " "))


def check(condition: bool, problem: str, fix: str | None = None) -> None:
    if not condition:
        raise UserError(problem, fix)
