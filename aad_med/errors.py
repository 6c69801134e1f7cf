"""The project's own error types: every expected failure is one of these, with a message a user
can act on (one line per problem, naming the file). Command-line tools print them without a
traceback; anything else is a bug."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class AADError(Exception):
    """Base class of every error aad-med raises on purpose."""


class InputError(AADError):
    """One problem with one input file (or folder).

    Args:
        path: the file or folder the problem is about.
        problem: what is wrong, in a few words ("truncated or corrupt gzip stream").
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Picklable with its fields, so it survives DataLoader workers and multiprocessing.
        return (type(self), (self.path, self.problem))


class CohortError(AADError):
    """Several problems found in one cohort, reported all at once (one line each)."""

    def __init__(self, problems: Iterable[str | InputError]):
        self.problems = [str(p) for p in problems]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems,))


class CheckpointError(AADError):
    """A checkpoint that cannot be loaded safely or does not match the data."""


class ConfigError(AADError):
    """A configuration value that cannot work (named in the message)."""
