"""The ``todi`` command line: one subcommand per pipeline step, one config dataclass per subcommand.

Each subcommand lives in the module that does the work and exposes a dataclass ``Config`` (its fields,
with ``metadata["help"]``, are the options) and ``run(config) -> None``. Options may also come from
``--config FILE.yaml``; values given on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from todi.errors import TodiError, UsageError


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    example: str
    config: str = "Config"
    run: str = "run"


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "todi.demo",
        "the whole pipeline on embedded data: teacher, SFT/FKL/RKL/ToDi students, evaluation, report",
        "todi demo --out todi-demo   (add --quick for a 3-minute run, --all for every divergence)",
    ),
    "eval": Command(
        "todi.evaluation",
        "sample answers and score ROUGE-L on instruction-following test sets",
        "todi eval --model out/student/final --data dolly,self-inst,vicuna --seeds 10,20,30 --out eval/",
    ),
    "judge": Command(
        "todi.judge",
        "compare two models' eval predictions pairwise with an LLM judge (local or OpenAI-compatible server)",
        "todi judge --a eval/todi --b eval/sft --judge HuggingFaceTB/SmolLM2-1.7B-Instruct --out judge/todi-vs-sft",
    ),
    "sft": Command(
        "todi.training",
        "fine-tune a model (the teacher) on instruction data",
        "todi sft --model gpt2-xl --data data/dolly --dev data/dolly/dev.jsonl --out runs/teacher",
        config="SFTConfig",
        run="run_sft",
    ),
    "distill": Command(
        "todi.training",
        "distil a teacher into a student with ToDi or a baseline divergence",
        "todi distill --teacher runs/teacher/final --student gpt2 --data data/dolly --loss todi --out runs/todi",
        config="DistillConfig",
        run="run_distill",
    ),
    "cache-teacher": Command(
        "todi.cache",
        "run the teacher once and store its top-k next-token distributions for `todi distill --teacher-cache`",
        "todi cache-teacher --teacher runs/teacher/final --data data/dolly --top-k 64 --out cache/teacher",
    ),
    "init-student": Command(
        "todi.student_init",
        "make a smaller student from a subset of a teacher's layers (same tokenizer)",
        "todi init-student --from HuggingFaceTB/SmolLM2-135M-Instruct --layers 0,6,12,18,24,29 --out student",
    ),
}


def _top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return (
        "usage: todi <command> [options]   (todi <command> --help for its options)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\nglobal options: --debug (show tracebacks), --version"
    )


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first_line: int, first_key: Any, top: bool) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line, self.first_key, self.top = key, line, first_line, first_key, top


def _unique_key_loader():
    """A YAML SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last).

    At the top level, ``max-length`` and ``max_length`` name one option, so they count as the same key.
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        _root: Any = None

        def construct_document(self, node):
            self._root = node
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                top = node is self._root
                seen: dict[Any, tuple[int, Any]] = {}
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node)
                    name = str(key).replace("-", "_") if top else key
                    line = key_node.start_mark.line + 1
                    if name in seen:
                        raise _DuplicateKey(key, line, *seen[name], top)
                    seen[name] = (line, key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _load_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist", "check the path given to --config") from None
    except _DuplicateKey as dup:
        what = "option" if dup.top else "key"
        spelled = "" if dup.first_key == dup.key else f" as {dup.first_key}"
        raise UsageError(
            f"config file {path} line {dup.line}: {what} {dup.key} is given twice "
            f"(first on line {dup.first_line}{spelled})",
            "keep only one of them: YAML would silently use the last value",
        ) from None
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {path} must hold a mapping of option: value, not {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(name: str, config_cls: type):
    from transformers import HfArgumentParser

    command = COMMANDS[name]
    parser = HfArgumentParser(
        config_cls,
        prog=f"todi {name}",
        description=(config_cls.__doc__ or command.help).strip().splitlines()[0],
        epilog=f"example:\n  {command.example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of options; command-line values override it"
    )
    return parser


def parse_config(name: str, argv: Sequence[str]) -> tuple[Callable[[Any], None], Any]:
    """Parse ``argv`` for subcommand ``name`` into its Config dataclass (YAML defaults, CLI overrides)."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    config_cls = getattr(module, command.config)
    parser = build_parser(name, config_cls)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = _load_yaml(known.config)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise UsageError(
                f"config file {known.config}: unknown option(s) {', '.join(unknown)}",
                f"run 'todi {name} --help' for the options",
            )
        parser.set_defaults(**values)
    (config,) = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)[:1]
    return getattr(module, command.run), config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        from todi import __version__

        print(f"todi {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"todi: unknown command {name!r}\nhint: choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        run, config = parse_config(name, rest)
        run(config)
    except TodiError as err:
        if debug:
            raise
        print(f"todi {name}: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt as err:
        # Ctrl-C exits 130; an interrupt raised for another signal (SIGTERM: 143) carries ``signum``.
        print(f"todi {name}: interrupted", file=sys.stderr)
        return 128 + int(getattr(err, "signum", None) or signal.SIGINT)
    except Exception as err:
        if debug:
            raise
        print(f"todi {name}: error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        print("hint: rerun with --debug for the full traceback", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
