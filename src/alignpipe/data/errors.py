"""The one error type for bad user data: it names the file, the row and the field.

``str(DataError)`` is a single line such as::

    data/train.jsonl: line 7: field 'chosen': expected a string or a list of messages, got int

Line numbers (``.jsonl``, ``.csv``) are 1-based, as editors show them; row numbers
(``.json``, ``.parquet``, ``hf:``) are 0-based indices and say so.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Unit = Literal["line", "row"]


class Where(NamedTuple):
    """Where a record came from: its source, and its line (1-based) or row (0-based) there."""

    file: str
    row: int | None = None
    unit: Unit = "row"


class DataError(ValueError):
    """Invalid user data. ``reason`` is a short slug (``"missing_field"``) used to count dropped rows."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        unit: Unit = "row",
        reason: str = "invalid",
    ) -> None:
        self.message = " ".join(str(message).split("\n"))
        self.file = file
        self.row = row
        self.field = field
        self.unit = unit
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.row is not None:
            parts.append(f"line {self.row}" if self.unit == "line" else f"row {self.row} (0-based)")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.message)
        return ": ".join(parts)

    def at(self, where: Where, field: str | None = None) -> DataError:
        """The same error located at ``where`` (and ``field``, unless it already names one)."""
        return DataError(
            self.message,
            file=where.file,
            row=where.row,
            field=self.field if self.field is not None else field,
            unit=where.unit,
            reason=self.reason,
        )


def type_name(value: object) -> str:
    """A JSON-flavoured name for ``value``'s type, for error messages."""
    if value is None:
        return "null"
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)
