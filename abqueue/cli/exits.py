"""Exit codes, each with what it means: the commands return these, and the exit-code reference in
the docs is generated from them (`python -m abqueue.reference`), so the two cannot disagree."""

from __future__ import annotations


class ExitCode(int):
    """An int (what the process exits with) that also says what it means, for the reference."""

    meaning: str

    def __new__(cls, code: int, meaning: str) -> ExitCode:
        self = super().__new__(cls, code)
        self.meaning = meaning
        return self


# Every command.
OK = ExitCode(0, "done: what the command was asked to do happened")
BUG = ExitCode(
    1,
    "an unexpected error, printed with its traceback: a bug to report (commands below give 1 a meaning of their own too)",
)
USER_ERROR = ExitCode(
    2,
    "one line `abq: error: ...` naming the problem and the fix: a bad flag or file, an unreachable broker, "
    "refused credentials or ACLs, a port in use, a model that does not load; also a worker whose engine "
    "died or that was fenced by its replacement (Kubernetes restarts it)",
)
INTERRUPTED = ExitCode(130, "interrupted (Ctrl-C); a batch job says how to resume")
PIPE_CLOSED = ExitCode(141, "the reader of the output went away (`abq ... | head`)")
GENERAL = (OK, BUG, USER_ERROR, INTERRUPTED, PIPE_CLOSED)
