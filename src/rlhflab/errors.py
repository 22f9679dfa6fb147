"""User-facing errors.

Anything the user can fix (a bad file, a missing column, an impossible config) raises a `UserError`.
The CLI catches it, prints the one message and exits with code 2, with no traceback. Bugs in rlhflab
itself stay ordinary exceptions so that their traceback reaches us.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what went wrong and what to do."""


class ConfigError(UserError):
    """An invalid configuration value, key or combination."""


class DataError(UserError):
    """A malformed data file or record.

    The message names the file, the record (line for JSONL, row for CSV/Parquet, index otherwise),
    the field, and what was expected.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ):
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.record, self.field = path, record, field


class TrainingHealthError(UserError):
    """Training stopped because a health guard fired (NaN/inf loss or log-probs, exploding KL).

    The message says which metric, at which step, and where the last good checkpoint is.
    """
