"""The docs cannot drift from the code: the README's config table names every config field with its default,
every field is documented where it is defined, and every relative link of the docs leads to a file or folder of
the repository."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from megapixel import config
from megapixel.config import Config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "CHANGELOG.md", REPO / "benchmarks" / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]
DOCUMENTED_CLASSES = (config.ModelConfig, config.DataConfig, config.TrainConfig, config.ParallelConfig, Config)


def config_keys() -> set[str]:
    """Every key a config has: `section.field` for the four sections, and the pass-through `deepspeed`."""
    keys = {"deepspeed"}
    for section in ("model", "data", "train", "parallel"):
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(getattr(Config(), section))}
    return keys


def shown_default(text: str) -> Any:
    """A default as the table writes it: a number, true/false, {} or a (backticked) string; empty is ""."""
    text = text.strip().strip("`")
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {} if text == "{}" else text


def config_table(readme: str) -> list[tuple[str, Any]]:
    """(key, default) for every key of the README's config table. A row may name several keys of one section
    (`train.beta1`, `beta2`: the later ones bare) with as many defaults, separated by commas or slashes."""
    section = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    found = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        key_cell, default_cell, _meaning = (cell.strip() for cell in row.strip().strip("|").split("|"))
        names = re.findall(r"`([^`]+)`", key_cell)
        # Separators inside backticks belong to the value (`runs/default`).
        defaults = [value.strip() for value in re.findall(r"`[^`]*`|[^,/`]+", default_cell) if value.strip()] or [""]
        assert len(names) == len(defaults), f"{row}: {len(names)} keys but {len(defaults)} defaults"
        prefix = ""
        for name, default in zip(names, defaults, strict=True):
            name = name.rstrip(":")
            if "." in name:
                prefix = name.split(".")[0] + "."
            elif prefix:
                name = prefix + name
            found.append((name, shown_default(default)))
    return found


def effective_default(key: str) -> Any:
    """What a key holds in a Config made without settings (model.n_ctx: derived from n_px)."""
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_config_field_has_a_row_in_the_readmes_config_table():
    shown = {key for key, _ in config_table(README.read_text())}
    assert sorted(config_keys() - shown) == []


def test_no_row_of_the_config_table_names_a_key_a_config_lacks():
    shown = [key for key, _ in config_table(README.read_text())]
    assert sorted(set(shown) - config_keys()) == []
    assert len(shown) == len(set(shown)), "a key has two rows"


def test_each_default_in_the_config_table_is_the_fields_default():
    wrong = []
    for key, shown in config_table(README.read_text()):
        if key not in config_keys():
            continue  # reported by the test above
        default = effective_default(key)
        if shown != default or isinstance(shown, bool) != isinstance(default, bool):
            wrong.append(f"{key}: the README shows {shown!r}, the default is {default!r}")
    assert wrong == []


def test_the_table_reader_splits_a_row_of_several_keys_of_one_section():
    table = "## Config reference\n\n| key | default | meaning |\n|---|---|---|\n"
    table += "| `train.beta1`, `beta2` / `model.n_px` | 0.9, 0.95 / 32 | ... |\n| `deepspeed:` | {} | ... |\n"
    assert config_table(table) == [("train.beta1", 0.9), ("train.beta2", 0.95), ("model.n_px", 32), ("deepspeed", {})]


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass `cls` in megapixel/config.py: the comment lines right above the
    field, or the comment at the end of its line."""
    source = Path(config.__file__).read_text()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    found = {}
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        line = statement.lineno
        above = []
        while line - 1 in comments and lines[line - 2].lstrip().startswith("#"):
            line -= 1
            above.insert(0, comments[line])
        trailing = comments.get(statement.lineno, "")
        found[statement.target.id] = " ".join([*above, trailing]).strip()
    return found


@pytest.mark.parametrize("cls", DOCUMENTED_CLASSES, ids=lambda cls: cls.__name__)
def test_every_config_field_has_a_comment_where_it_is_defined(cls):
    comments = field_comments(cls)
    assert sorted(comments) == sorted(f.name for f in dataclasses.fields(cls)), "the comment reader missed a field"
    assert [name for name, comment in comments.items() if not comment] == []


def test_the_comment_reader_reads_comments_above_and_beside_a_field():
    comments = field_comments(config.TrainConfig)
    assert comments["max_skipped_steps"].startswith("Stop (after saving) when this many steps in a row")
    assert "leaves room for it" in comments["max_skipped_steps"]


def headings(text: str) -> set[str]:
    """The anchors GitHub gives a markdown file's headings."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return anchors


def link_problems(doc: Path, text: str) -> list[str]:
    """What is wrong with the links of markdown `text` found at `doc`: a relative link must lead to a file or
    folder inside the repository (and to a heading there, when it names one); web links are not followed."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        parts = urlsplit(target)
        if parts.scheme in ("http", "https"):
            continue
        if parts.scheme or parts.netloc or parts.path.startswith("/"):
            problems.append(f"{target}: not a relative link")
            continue
        path = (doc.parent / parts.path).resolve() if parts.path else doc
        if not path.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file or folder")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in headings(path.read_text()):
            problems.append(f"{target}: no such heading in {path.relative_to(REPO)}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_relative_link_leads_into_the_repository(doc):
    assert link_problems(doc, doc.read_text()) == []


def test_the_link_checker_refuses_links_out_of_the_repository_and_to_nothing():
    text = (
        "[a](architecture.md) [b](../README.md#quick-start) [c](https://arxiv.org) "
        "[d](../../shared/DESIGN.md) [e](/etc/passwd) [f](missing.md) [g](../README.md#no-such-heading) "
        "`[h](ignored-in-code.md)`"
    )
    problems = link_problems(REPO / "docs" / "example.md", text)
    assert [problem.split(":")[0] for problem in problems] == [
        "../../shared/DESIGN.md",
        "/etc/passwd",
        "missing.md",
        "../README.md#no-such-heading",
    ]
