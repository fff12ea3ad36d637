"""The ``todi`` command line: one subcommand per pipeline step, one config dataclass per subcommand.

Each subcommand lives in the module that does the work and exposes a dataclass ``Config`` (its fields,
with ``metadata["help"]``, are the options) and ``run(config) -> None``. Options may also come from
``--config FILE.yaml``; values given on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
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
    "xtok-report": Command(
        "todi.xtok.report",
        "before cross-tokenizer distillation: aligned positions, vocabulary overlap, teacher mass on matched tokens",
        "todi xtok-report --teacher HuggingFaceTB/SmolLM2-135M-Instruct --student gpt2 --data data/dolly",
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


class _FlagValue(argparse.Action):
    """A flag that sets another option: ``--bf16`` / ``--bf16 true`` -> ``--mixed-precision bf16``; ``--bf16
    false`` -> ``no`` where the value was ``auto`` or bf16 (``--bf16 true --fp16 false`` stays bf16)."""

    def __init__(self, option_strings: list[str], dest: str, *, on: str, off: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", const="true", default=argparse.SUPPRESS, **kwargs)
        self.on, self.off = on, off

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from transformers.hf_argparser import string_to_bool

        try:
            enabled = string_to_bool(values)
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option_string}: {err}")
        chosen = vars(namespace).setdefault("_flag_values", {})
        if enabled:
            others = [flag for flag, value in chosen.items() if value not in (self.off, self.on)]
            if others:
                parser.error(f"argument {option_string}: not allowed with {others[0]} (choose one)")
            setattr(namespace, self.dest, self.on)
        elif getattr(namespace, self.dest, None) in ("auto", self.on):
            setattr(namespace, self.dest, self.off)
        chosen[option_string] = self.on if enabled else self.off


def _parser_class():
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser that shows a config's options in its ``option_groups`` (``--help``)."""

        def _add_dataclass_arguments(self, dtype: Any) -> None:
            groups = getattr(dtype, "option_groups", None)
            if not groups:
                super()._add_dataclass_arguments(dtype)
                return
            import typing

            hints = typing.get_type_hints(dtype)
            fields = [f for f in dataclasses.fields(dtype) if f.init]
            names = {f.name for f in fields}
            containers = {
                group: self.add_argument_group(f"{group} options")
                for group, members in groups.items()
                if names & set(members)
            }
            home = {member: containers.get(group) for group, members in groups.items() for member in members}
            for field in fields:
                field.type = hints[field.name]
                self._parse_dataclass_field(home.get(field.name) or self, field)
            for flag, (dest, on, off) in getattr(dtype, "flag_values", {}).items():
                container = home.get(dest) or self
                container.add_argument(
                    f"--{flag}",
                    action=_FlagValue,
                    dest=dest,
                    on=on,
                    off=off,
                    metavar="BOOL",
                    help=f"as --{dest.replace('_', '-')} {on} (false: {off}); the Trainer's spelling",
                )

    return Parser


def build_parser(name: str, config_cls: type):
    command = COMMANDS[name]
    parser = _parser_class()(
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


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every spelling of every option (``learning_rate``, ``lr``, ``max-length``...) -> its destination."""
    names = {}
    for action in parser._actions:
        for spelling in action.option_strings:
            if spelling.startswith("--"):
                names[spelling[2:]] = action.dest
    return names


def _did_you_mean(given: str, spellings: Sequence[str]) -> str:
    close = difflib.get_close_matches(given, spellings, n=3, cutoff=0.6)
    return f"did you mean {' or '.join('--' + c for c in close)}? " if close else ""


def _unknown_options(name: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse arguments no option takes, suggesting the nearest spellings of the options that exist."""
    _, rest = parser.parse_known_args(argv)
    if not rest:
        return
    flags = [a for a in rest if a.startswith("-")]
    spellings = sorted(_option_names(parser))
    if flags:
        given = flags[0].lstrip("-").split("=", 1)[0]
        raise UsageError(
            f"unknown option {flags[0].split('=', 1)[0]}"
            + (f" (and {', '.join(flags[1:])})" if flags[1:] else ""),
            f"{_did_you_mean(given, spellings)}run 'todi {name} --help' for the options",
        )
    raise UsageError(
        f"unexpected argument(s) {' '.join(rest)}",
        f"every value follows its option (e.g. --lr 1e-4); run 'todi {name} --help' for the options",
    )


def _yaml_values(name: str, parser: argparse.ArgumentParser, config_cls: type, path: str) -> dict[str, Any]:
    """The options of a YAML file, keyed by destination: any spelling of an option is accepted (``lr`` or
    ``learning_rate``), as are the flags that set another option (``bf16: true``)."""
    spellings = {k.replace("-", "_"): dest for k, dest in _option_names(parser).items() if dest != "config"}
    flags = getattr(config_cls, "flag_values", {})
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown = []
    for key, value in _load_yaml(path).items():
        if key in flags:
            dest, on, off = flags[key]
            value = on if value is True or str(value).lower() in ("true", "yes", "1") else off
        else:
            dest = spellings.get(key)
        if dest is None:
            unknown.append(key)
            continue
        if dest in given:
            raise UsageError(
                f"config file {path}: {given[dest]} and {key} name the same option",
                "keep only one of them",
            )
        given[dest] = key
        values[dest] = value
    if unknown:
        hints = [_did_you_mean(key, sorted(spellings)).replace("--", "") for key in unknown]
        raise UsageError(
            f"config file {path}: unknown option(s) {', '.join(unknown)}",
            f"{''.join(hints)}run 'todi {name} --help' for the options",
        )
    return values


def parse_config(name: str, argv: Sequence[str]) -> tuple[Callable[[Any], None], Any]:
    """Parse ``argv`` for subcommand ``name`` into its Config dataclass (YAML defaults, CLI overrides)."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    config_cls = getattr(module, command.config)
    parser = build_parser(name, config_cls)
    _unknown_options(name, parser, argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_values(name, parser, config_cls, known.config))
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
