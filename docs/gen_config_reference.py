"""Generate docs/config_reference.md from the config dataclasses (fields, types, defaults and the
comments next to each field in the source).

    python docs/gen_config_reference.py            # rewrite docs/config_reference.md
    python docs/gen_config_reference.py --check    # exit 1 if it is out of date (tests/test_docs.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

OUT = Path(__file__).resolve().parent / "config_reference.md"
COMMAND = "python docs/gen_config_reference.py"

# (module, title, what reads it): every dataclass defined in the module is documented, in source order
SECTIONS = [
    ("marjax.config", "Model, spiking, distillation and training configs",
     "Frozen dataclasses (static under jit); derive variants with `dataclasses.replace`. In TOML run "
     "configs and `key=value` overrides, a field is addressed by its section: `train.steps=50`, "
     "`atmn.T=2`, `train.mesh.data=2`."),
    ("marjax.app.runner", "Run config of `marjax distill`",
     "`marjax distill --stage S --config run.toml section.key=value ...`: the TOML sections are the "
     "fields of `RunConfig` ([run], [train], [distill], [atmn])."),
    ("marjax.app.pipeline", "Pipeline config of `marjax pipeline`",
     "`marjax pipeline --config pipeline.toml key=value ...`: the TOML sections are the fields of "
     "`PipelineConfig`."),
    ("marjax.app.recipe", "The stage recipe (pipeline `[recipe]` and the per-stage plans)", ""),
    ("marjax.eval.energy", "Energy model constants (`marjax energy`, `marjax.eval.energy`)", ""),
]
SKIP = {"Ops"}   # dataclasses that are values, not configs


def _comments(cls) -> dict:
    """field name -> the comment on its line, continued by comment-only lines below aligned with
    it, plus comment-only lines right above the field that do not continue another field's."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    inline, own_line = {}, {}      # row -> (text, column)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            entry = (tok.string.lstrip("#").strip(), tok.start[1])
            (own_line if lines[row - 1].strip().startswith("#") else inline)[row] = entry
    continued = {}                 # own-line row -> the row of the inline comment it continues
    for row in sorted(own_line):
        prev = continued.get(row - 1, row - 1)
        if prev in inline and own_line[row][1] == inline[prev][1]:
            continued[row] = prev
    out = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for row, line in enumerate(lines, 1):
        head = line.strip().split(":", 1)[0].strip()
        if head in names and ":" in line and not line.strip().startswith("#"):
            above, r = [], row - 1
            while r in own_line and r not in continued:
                above.insert(0, own_line[r][0])
                r -= 1
            below = [own_line[r][0] for r in sorted(continued) if continued[r] == row]
            parts = above + ([inline[row][0]] if row in inline else []) + below
            out.setdefault(head, " ".join(parts))
    return out


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return f"`{type(value).__name__}()` (see below)"
        return f"`{value!r}`"
    return "required"


def _cell(s: str) -> str:
    return " ".join(str(s).replace("|", "\\|").split())


def _classes(module):
    found = [o for o in vars(module).values()
             if isinstance(o, type) and dataclasses.is_dataclass(o) and o.__module__ == module.__name__
             and o.__name__ not in SKIP]
    return sorted(found, key=lambda c: inspect.getsourcelines(c)[1])


def _class_doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    # dataclasses invent a signature docstring when there is none: not documentation
    return "" if doc.startswith(cls.__name__ + "(") else doc


def generate() -> str:
    out = ["# Config reference", "",
           f"Generated from the config dataclasses by `{COMMAND}`; do not edit by hand "
           "(a test fails when this file is out of date).", ""]
    for mod_name, title, intro in SECTIONS:
        module = importlib.import_module(mod_name)
        out += [f"## {title}", "", f"Module `{mod_name}`." + (f" {intro}" if intro else ""), ""]
        for cls in _classes(module):
            out += [f"### `{cls.__name__}`", ""]
            doc = _class_doc(cls)
            if doc:
                out += [doc, ""]
            notes = _comments(cls)
            out += ["| field | type | default | notes |", "|---|---|---|---|"]
            for f in dataclasses.fields(cls):
                out.append(f"| `{f.name}` | `{_cell(f.type)}` | {_cell(_default(f))} | {_cell(notes.get(f.name, ''))} |")
            out.append("")
    from marjax.config import PRESETS
    out += ["## Presets", "", "`marjax.preset(name)` / `marjax.load(name)` (random weights) / `--model name`.", "",
            "| name | mixer | spiking | vocab | d_model | layers | heads (kv) | head_dim | d_ff | max_seq_len |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in PRESETS.items():
        out.append(f"| `{name}` | {c.mixer} | {'yes' if c.atmn is not None else 'no'} | {c.vocab_size} | {c.d_model} "
                   f"| {c.n_layers} | {c.n_heads} ({c.n_kv_heads}) | {c.head_dim} | {c.d_ff} | {c.max_seq_len} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/config_reference.md is out of date")
    a = ap.parse_args(argv)
    text = generate()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.name} is out of date; regenerate with: {COMMAND}", file=sys.stderr)
            return 1
        print(f"{OUT.name} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
