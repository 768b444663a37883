"""The ``vqwavenet`` command: one entry point for the codec, the web app and training.

    vqwavenet encode speech.wav                    # -> speech.vqwc
    vqwavenet decode speech.vqwc --speaker Carlo   # -> speech.decoded.wav
    vqwavenet resynth folder/ -o out/              # encode + decode every file
    vqwavenet serve                                # the web app (pip install 'vqwavenet[app]')
    vqwavenet train --config small --data data/asterisk --out runs/small   # ('[train]')

Each subcommand is a module's ``main(argv)`` (``python -m app.cli``, ``python -m app``,
``python -m training.train`` ...), so ``vqwavenet CMD --help`` shows that module's options
(the codec's commands also take ``prog``, so their usage says ``vqwavenet encode``). A
subcommand whose extra is not installed says which one to install instead of failing on an
import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # whose main(argv) runs
    help: str
    extra: str | None = None  # the pip extra it needs
    needs: str | None = None  # a module that extra provides
    prefix: tuple[str, ...] = ()  # arguments put before the user's (app.cli's own subcommand)
    prog: str | None = None  # given to main(argv, prog=...) so usage and help name this command


COMMANDS = {
    "encode": Command("app.cli", "audio -> codes files", prefix=("encode",), prog="vqwavenet"),
    "decode": Command("app.cli", "codes files -> wav", prefix=("decode",), prog="vqwavenet"),
    "resynth": Command(
        "app.cli", "audio -> audio, in a speaker's voice", prefix=("resynth",), prog="vqwavenet"
    ),
    "serve": Command("app.__main__", "the web app", "app", "gradio"),
    "primer": Command("vqwavenet.primer", "add a primer to a model directory"),
    "prepare": Command("training.prepare", "prepare a corpus for training", "train", "torch"),
    "train": Command("training.train", "train a model", "train", "torch"),
    "export": Command("export.__main__", "export a checkpoint to ONNX", "train", "torch"),
    "warm-start": Command(
        "training.warm_start", "trainable weights from an exported model", "train", "torch"
    ),
    "evaluate": Command("training.evaluate", "evaluate a model", "eval", "pocketsphinx"),
    "invariance": Command("training.invariance", "check batch invariance", "train", "torch"),
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqwavenet",
        description="A speech codec on onnxruntime: the codec, the web app and training.",
        epilog="Run 'vqwavenet COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        extra = f" (needs vqwavenet[{command.extra}])" if command.extra else ""
        sub.add_parser(name, help=command.help + extra, add_help=False)
    return p


def _version() -> str:
    from vqwavenet import __version__

    return f"vqwavenet {__version__}"


def fatal(message: str, code: int = 2) -> int:
    print(f"vqwavenet: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        get_parser().parse_args(argv)  # prints usage, help or version, and exits
        return 2
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    if command.needs and importlib.util.find_spec(command.needs) is None:
        return fatal(
            f"'{name}' needs {command.needs}, which is not installed: "
            f"pip install 'vqwavenet[{command.extra}]'"
        )
    if importlib.util.find_spec(command.module) is None:
        return fatal(f"'{name}' is not part of this version ({command.module} is missing)")
    module = importlib.import_module(command.module)
    argv = [*command.prefix, *rest]
    if command.prog is None:
        return int(module.main(argv) or 0)
    return int(module.main(argv, prog=command.prog) or 0)


if __name__ == "__main__":
    sys.exit(main())
