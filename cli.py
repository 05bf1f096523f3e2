"""The command-line conventions every script shares: bad input ends in one line `error: ...` and exit code 2.

A flag outside its meaningful range, a missing or unreadable file, a checkpoint that does not fit: the user
gets one line naming the problem and what to do, never a traceback and never a silent run.

    from cli import ArgumentParser, ConfigError, positive_int, run_cli
    p = ArgumentParser(description="...")
    p.add_argument("--batch_size", type=positive_int, default=64)
    ...
    if __name__ == "__main__":
        run_cli(main)
"""
import argparse
import os
import sys

import torch


class ConfigError(Exception):
    """A problem with the user's input or environment (flags, files, disk): reported as one line, exit code 2."""


def run_cli(main):
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # stdout closed by its reader (`python train.py | head`): stop quietly, as a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help text already says what it is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help, and its errors (unknown flag, bad value) as one line, exit code 2.
    A flag must be spelled whole: `--epoch 2` is an error, not a silent `--epochs 2` (allow_abbrev=False)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def show_presets(parser, presets, rename=None):
    """Append to each flag's help what every preset sets it to: {preset name: {flag dest: value}}."""
    for action in parser._actions:
        values = {}
        for name, preset in presets.items():
            if action.dest in preset:
                values.setdefault(str(preset[action.dest]), []).append((rename or {}).get(name, name))
        if values:
            said = "; ".join(f"{', '.join(names)}: {value}" for value, names in values.items())
            action.help += f" [{said}]" if "default" in action.help else f" (default: {action.default}; {said})"


def bool_flag(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _checked(kind, ok, what):
    """An argparse type: `kind(s)` that must satisfy `ok`, else the message 'expected <what>, got <s>'."""
    def parse(s):
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "an integer > 0")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
unit_float = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def existing_file(path):
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is not a file" + (" (it does not exist)"
                                                                     if not os.path.exists(path) else ""))
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be read (permissions)")
    return path


def existing_path(path):
    """A file or a folder that exists."""
    return path if os.path.isdir(path) else existing_file(path)


def existing_dir(path):
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is not a folder" + (" (it does not exist)"
                                                                      if not os.path.exists(path) else ""))
    return path


def device(name):
    """A torch device that this machine has: 'cpu', 'cuda', 'cuda:1'..."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu or cuda, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no CUDA GPU is available here (use cpu)")
    return name
