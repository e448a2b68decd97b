"""`marjax` command: a thin dispatcher; each subcommand lives with its concern and exposes
`main(argv) -> int`. Modules are imported lazily so `marjax --help` is instant."""
from __future__ import annotations

import importlib
import sys

from marjax import __version__  # the package is already imported (marjax.cli lives in it)
from marjax.app import hostmem  # os and sys only: `--help` stays instant
from marjax.errors import MarjaxError

COMMANDS = {
    "generate": ("marjax.app.generate", "main", "generate text from a model (streams tokens)"),
    "convert": ("marjax.app.commands", "convert_main", "attention -> SSM init of a Llama model"),
    "distill": ("marjax.app.commands", "distill_main", "run one distillation stage (orient|align|kd|sbds)"),
    "pipeline": ("marjax.app.commands", "pipeline_main", "the whole MAR pipeline, then eval + energy"),
    "eval": ("marjax.eval.cli", "main", "perplexity and zero-shot multiple-choice tasks"),
    "energy": ("marjax.eval.energy", "main", "analytic energy report (45 nm constants)"),
    "bench": ("marjax.bench", "main", "benchmarks: ssd | atmn | step | decode | eval | all"),
    "plan": ("marjax.app.plan", "main", "lower/compile a stage's step on a mesh: bytes, FLOPs, tokens/s"),
    "launch": ("marjax.app.launch", "main", "run a marjax command as N JAX processes (jax.distributed)"),
}


def _usage() -> str:
    lines = ["usage: marjax <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`marjax <command> --help` for a command's options; `marjax --version` for the version."]
    return "\n".join(lines)


# commands whose time is train steps, where malloc tunables that keep XLA's per-step temporaries
# mapped pay for a re-execution (marjax.app.hostmem); a short command (generate, eval) only pays
# its ~2-3 s
TRAINING_COMMANDS = ("pipeline", "distill")


# commands that compile big programs and do not measure compile time: they use JAX's persistent
# compilation cache (marjax.app.compile_cache; MARJAX_COMPILE_CACHE=0 turns it off)
CACHED_COMMANDS = ("generate", "convert", "distill", "pipeline", "eval")


def _trains(cmd: str, rest: list) -> bool:
    return cmd in TRAINING_COMMANDS or (cmd == "bench" and rest[:1] == ["step"])


def main(argv=None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"marjax {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"marjax: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if from_command_line and _trains(cmd, rest):   # the `marjax` command, not a call from Python
        hostmem.reexec_for_hugepages()
    module, func, _ = COMMANDS[cmd]
    try:
        if cmd in CACHED_COMMANDS:
            from marjax.app import compile_cache  # late import: `--help` stays instant
            compile_cache.enable()
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except MarjaxError as e:  # user-facing errors: one clear line, no JAX traceback
        print(f"marjax {cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"marjax {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
