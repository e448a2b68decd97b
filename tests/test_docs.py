"""docs/: the config reference is generated and current, links resolve, every command and error
class is documented, and the API examples run."""
import importlib.util
import re
from pathlib import Path

import pytest

import marjax.errors
from marjax.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["install.md", "api.md", "cli.md", "config_reference.md", "data_formats.md", "faq.md"]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_current():
    gen = _generator()
    assert (DOCS / "config_reference.md").read_text() == gen.generate(), \
        f"docs/config_reference.md is out of date; regenerate with: {gen.COMMAND}"


def test_config_reference_lists_every_field():
    import dataclasses
    from marjax import config
    text = (DOCS / "config_reference.md").read_text()
    for cls in (config.ModelConfig, config.ATMNConfig, config.SSMConfig, config.TrainConfig, config.DistillConfig):
        section = text.split(f"### `{cls.__name__}`", 1)[1].split("### ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in section, f"{cls.__name__}.{f.name} missing"


def test_config_reference_comments_stay_with_their_field():
    """A comment continued on the lines below a field belongs to that field, not the next."""
    from marjax.config import TrainConfig
    got = _generator()._comments(TrainConfig)
    assert got["nonfinite"].endswith("log it, go on)") and "checkpoint kept" in got["nonfinite"]
    assert got["max_skips"].startswith('"skip": this many')
    assert got["optimizer"].endswith("the experiment tables pin it)")
    assert got["layer_layout"].startswith("stacked:")


def _anchor(heading: str) -> str:   # GitHub's heading slugs
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_pages_exist_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    doc_section = readme.rsplit("## Documentation", 1)[-1]
    for page in PAGES:
        assert (DOCS / page).is_file(), page
        assert f"docs/{page}" in doc_section, f"README's Documentation section does not link {page}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", (DOCS / page).read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            dest = (DOCS / path) if path else DOCS / page
            assert dest.is_file(), f"{page}: broken link {target}"
            if anchor and dest.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
                assert anchor in anchors, f"{page}: no heading for #{anchor} in {dest.name}"


def test_cli_and_faq_cover_commands_and_errors():
    cli = (DOCS / "cli.md").read_text()
    for cmd in COMMANDS:
        assert f"## {cmd}" in cli, f"docs/cli.md does not document `marjax {cmd}`"
    faq = (DOCS / "faq.md").read_text()
    for name, obj in vars(marjax.errors).items():
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == "marjax.errors":
            assert name in faq, f"docs/faq.md does not mention {name}"


def _python_blocks(page: str) -> list:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_api_examples_compile():
    blocks = _python_blocks("api.md")
    assert len(blocks) >= 8
    for i, src in enumerate(blocks):
        compile(src, f"api.md block {i}", "exec")


@pytest.mark.slow
def test_api_examples_run():
    ns: dict = {}
    for i, src in enumerate(_python_blocks("api.md")):
        exec(compile(src, f"api.md block {i}", "exec"), ns)
