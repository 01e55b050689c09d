"""The `clipcap` command line: `clipcap caption IMAGE... --model DIR` and the other subcommands.

Each subcommand is a module here with `add_arguments(parser)` and `run(args)`, imported only when that subcommand
runs: `clipcap caption` then needs neither the datasets library (`clipcap evaluate`), nor the converter, nor the
training code. The library never imports this package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence


class _SubcommandParser(argparse.ArgumentParser):
    """
    A subcommand's parser, which takes its arguments from its module when it parses (or shows its help). Every
    multi-word option is also taken with underscores (`--data_files` for `--data-files`), as `clipcap train`'s
    HfArgumentParser takes `--train-file` for `--train_file`, so that no spelling learned on one subcommand is refused
    by the next.
    """

    def __init__(self, *args, module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._module = module

    def parse_known_args(self, args=None, namespace=None):
        if self._module is not None:
            module = importlib.import_module(f"{__name__}.{self._module}")
            module.add_arguments(self)
            self.set_defaults(handler=module.run)
            self._module = None
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._with_dashes(args), namespace)

    def _with_dashes(self, args: list[str]) -> list[str]:
        """
        `args` with each option spelled with underscores (`--data_files`, `--top_p=0.9`, `--no_int8`) spelled as the
        parser knows it. Rewriting the arguments, rather than adding the spelling to each option, keeps --help and
        error messages to one spelling and leaves `--no-...` of `BooleanOptionalAction` working.
        """
        options = {option for action in self._actions for option in action.option_strings if option.startswith("--")}
        underscored = {"--" + option[2:].replace("-", "_"): option for option in options}
        dashed = {spelling: option for spelling, option in underscored.items() if spelling not in options}
        rewritten = []
        for position, arg in enumerate(args):
            if arg == "--":  # what follows is positional, even where it looks like an option
                return rewritten + args[position:]
            name, equals, value = arg.partition("=")
            rewritten.append(dashed[name] + equals + value if name in dashed else arg)
        return rewritten


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcap",
        description="ClipCap image captioning with Hugging Face. Every multi-word option may be spelled with dashes "
        "or underscores: --num-beams or --num_beams, --train_file or --train-file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    commands.add_parser(
        "ablate",
        module="ablate",
        help="Train a grid of variants (prefix length, mapper, frozen or fine-tuned LM, vision tower) and plot their "
        "scores.",
    )
    commands.add_parser("caption", module="caption", help="Caption image files, folders or glob patterns.")
    commands.add_parser(
        "convert-original",
        module="convert",
        help="Convert a checkpoint released with the paper (rmokady/CLIP_prefix_caption) into a ClipCap folder.",
    )
    # No option of its own, as train: its source options are the training arguments' (HfArgumentParser).
    commands.add_parser(
        "embed",
        module="embed",
        add_help=False,
        prefix_chars="+",
        help="Embed every image of a source once (all GPUs), for `clipcap train --embeddings DIR`.",
    )
    commands.add_parser(
        "evaluate", module="evaluate", help="Caption a dataset and score it with the COCO caption metrics."
    )
    commands.add_parser(
        "interpret",
        module="interpret",
        help="Show each prefix vector's nearest language model tokens (the paper's prefix interpretability).",
    )
    commands.add_parser(
        "export-onnx",
        module="export_onnx",
        help="Export a model to ONNX graphs (fp32 and int8) for ONNX Runtime and the browser captioner.",
    )
    commands.add_parser("demo", module="demo", help='Serve a web demo (Gradio; `pip install "clipcap_hf[demo]"`).')
    commands.add_parser(
        "quickstart",
        module="quickstart",
        help="Train a small captioner from scratch on built-in synthetic shapes (offline, a few minutes on a CPU).",
    )
    # No option of its own (prefix '+'), so that every `--flag`, `--help` included, reaches the training arguments.
    commands.add_parser(
        "train",
        module="train",
        add_help=False,
        prefix_chars="+",
        help="Train a ClipCap model (see `clipcap train --help`).",
    )
    return parser


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """
    Turn SIGTERM (what `kill`, `timeout`, container runtimes and job schedulers send) into `SystemExit(143)` while a
    command runs, so that its cleanups run as they do for Ctrl-C: a conversion stopped so removes its half-written
    folder, where the default action would end the process on the spot and leave it. Only from the main thread (the
    one Python runs handlers in) and where SIGTERM has its default action: a handler of the program that called
    `main` is its own. The default is back afterwards, and from the first SIGTERM on: a second one, while the
    cleanups run, ends the process at once.
    """
    # Not in a process of a distributed run (torchrun, accelerate launch): one waiting in a collective operation for
    # its peers would not return to Python to run the handler, and would outlive the launcher's SIGTERM.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (
        distributed
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)  # the status of a process ended by the signal, as shells report it

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # argparse's own exit (--help, or a refused option it has printed): a status here too
        return exit.code if isinstance(exit.code, int) else 2
    if hasattr(sys.stdout, "reconfigure"):
        # A file name or caption that stdout's encoding cannot show (cp1252 on Windows) is escaped, not fatal.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        with _sigterm_as_exit():
            return args.handler(args)
    except BrokenPipeError:
        # The reader went away (`clipcap caption ... | head -1`): stop quietly, with the exit status of a program
        # ended by SIGPIPE (128 + 13), as `cat` would give. Python would report the pipe again when it flushes
        # stdout at exit, so stdout now points at devnull (see the `signal` module's documentation).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout is no real file (replaced by a caller)
            pass
        return 141
    except (ValueError, OSError, ImportError) as error:
        # An ImportError here is a missing optional extra (gradio, pycocoevalcap); its message says what to install.
        # An OSError covers missing files and a --model folder that does not exist or holds no weights.
        print(f"clipcap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
