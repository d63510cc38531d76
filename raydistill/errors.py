"""The one error type that reaches users: one line naming the field, the value and what is allowed."""


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is the single line the CLI prints before exiting non-zero."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")
