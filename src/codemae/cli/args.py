"""Command-line conventions shared by every subcommand (docs/cli.md): ``type=`` checks that refuse a
bad value with one line naming the option, defaults in every help, and subcommand-level usage errors."""

from __future__ import annotations

import argparse
import copy


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (seeds, epochs, sample counts, batch and image sizes)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (``--shots 0``: the whole training pool; worker counts)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; checked against the machine when the command runs
    (:func:`codemae.eval.device.resolve_device`)."""
    if not (text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` of every evaluation, analysis and inference command; the handler resolves it with
    ``codemae.eval.device.resolve_device(args.device)``."""
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: CUDA when available, else CPU)")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (``None``) or is a switch."""

    @staticmethod
    def default_of(action: argparse.Action) -> str | None:
        default = action.default
        if action.nargs == 0 or default in (None, argparse.SUPPRESS) or (
                not action.option_strings and action.nargs not in ("?", "*")):
            return None
        text = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return text.replace("%", "%%")

    def _get_help_string(self, action: argparse.Action) -> str:
        default = self.default_of(action)
        if default is None or "default:" in (action.help or ""):
            return action.help or ""
        return f"{action.help} (default: {default})" if action.help else f"default: {default}"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self.default_of(action) is not None:  # argparse skips help-less options
            action = copy.copy(action)
            action.help = f"default: {self.default_of(action)}"
        return super()._format_action(action)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser (``add_subparsers(parser_class=...)``, inherited by nested subcommands):
    defaults shown in its help, and an unknown option reported with this subcommand's usage, where
    argparse would hand it up to the top-level parser and print the top-level usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            import difflib

            options = [o for o in self._option_string_actions if o.startswith("--")]
            near = [m for x in extras if x.startswith("-")
                    for m in difflib.get_close_matches(x.split("=")[0], options, n=1)]
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {near[0]}?)" if near else ""))
        return namespace, extras
