"""Errors shared by every stage."""


class InputError(ValueError):
    """Bad user input: the message names the file, the 1-based line and the field."""

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where) + ": " if where else ""
        super().__init__(prefix + message)
        self.path, self.line, self.field = path, line, field
