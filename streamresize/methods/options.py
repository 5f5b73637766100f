"""Typed method options: each method declares its own, with defaults and validation, so an option
that means nothing to a method is refused with the list of those it takes."""

import math
from dataclasses import dataclass

from ..errors import StreamResizeError


@dataclass(frozen=True)
class Option:
    default: object
    kind: type  # bool, int, float or str
    help: str
    choices: tuple = ()
    minimum: float | None = None  # inclusive lower bound for numbers
    positive: bool = False  # numbers strictly above zero
    recorded: bool = True  # False: a switch for tests, written to the output's record only when set

    def parse(self, method, key, value):
        """The value as this option's kind, or a StreamResizeError naming the method and option."""
        where = f"method option {key}={value!r} for {method}"
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise StreamResizeError(f"{where}: expected true or false")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise StreamResizeError(f"{where}: expected a number")
            try:
                number = float(value)
            except ValueError:
                raise StreamResizeError(f"{where}: expected a number") from None
            if not math.isfinite(number):
                raise StreamResizeError(f"{where}: expected a finite number")
            if self.kind is int:
                if number != int(number):
                    raise StreamResizeError(f"{where}: expected a whole number")
                number = int(number)
            elif isinstance(value, int):
                number = value  # keep an integer as given: it is recorded as written
            if self.positive and number <= 0:
                raise StreamResizeError(f"{where}: must be above 0")
            if self.minimum is not None and number < self.minimum:
                raise StreamResizeError(f"{where}: must be at least {self.minimum}")
            return number
        value = str(value)
        if self.choices and value not in self.choices:
            raise StreamResizeError(f"{where}: choose from {', '.join(self.choices)}")
        return value


def resolve_options(method, spec, given):
    """Defaults (the recorded ones) overlaid with the validated `given` options."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise StreamResizeError(f"unknown method option(s) {', '.join(unknown)} for {method}; known: "
                                f"{', '.join(sorted(spec)) or '(none)'}")
    options = {key: option.default for key, option in spec.items() if option.recorded}
    options.update({key: spec[key].parse(method, key, value) for key, value in given.items()})
    return options


def describe(spec):
    """One line per option, for help texts and the README."""
    return [f"{key}: {o.help} (default {o.default!r}{', one of ' + '|'.join(o.choices) if o.choices else ''})"
            for key, o in sorted(spec.items())]
