"""One grammar for every command, read from what users read: each command's ``--help``.

Every command lists ``--config`` and ``--debug``, every command that writes files ``-o/--output``;
an option shared by several commands has one spelling and one meaning (the same flags and the same
help everywhere; only ``--output`` says what each command writes); values that start with a minus
sign may follow a space.
"""
from __future__ import annotations

import re

import pytest

from dinov3_geo.cli import main, parse

COMMANDS = [["segment"], ["classify"], ["embed"], ["similar"], ["cluster"], ["change"], ["view"],
            ["train", "classify"], ["train", "segment"], ["eval", "geobench"]]
WRITES_FILES = [c for c in COMMANDS if c != ["eval", "geobench"]]
_ENTRY = re.compile(r"^  (-[^ ].*?)(?:  +(\S.*))?$")
_FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def options_of(command: list[str], capsys) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{long flag: (every flag of the entry, its help text)}`` from the command's ``--help``."""
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    section = text[text.index("\noptions:\n") + len("\noptions:\n"):].splitlines()
    entries: list[list[str]] = []
    for line in section:
        match = _ENTRY.match(line)
        if match:
            entries.append([match.group(1), match.group(2) or ""])
        elif line.startswith("   ") and entries:
            entries[-1][1] += " " + line.strip()
    out = {}
    for flags_text, help_text in entries:
        flags = tuple(dict.fromkeys(_FLAG.findall(flags_text)))
        out[flags[-1]] = (flags, " ".join(help_text.split()))
    return out


@pytest.fixture(scope="module")
def helps():
    return {}


def test_every_command_has_config_and_debug_and_output_where_it_writes(capsys):
    for command in COMMANDS:
        options = options_of(command, capsys)
        assert "--config" in options and "--debug" in options, command
        if command in WRITES_FILES:
            assert options["--output"][0] == ("-o", "--output"), command


def test_a_shared_option_has_one_spelling_and_one_meaning(capsys):
    seen: dict[str, dict[str, tuple]] = {}
    for command in COMMANDS:
        for flag, (flags, text) in options_of(command, capsys).items():
            seen.setdefault(flag, {})[" ".join(command)] = (flags, text)
    shared = {flag: by for flag, by in seen.items() if len(by) > 1}
    assert {"--head", "--backbone", "--tile", "--bands", "--scale", "--device", "--overwrite"} <= set(shared)
    for flag, by in shared.items():
        spellings = {flags for flags, _ in by.values()}
        assert len(spellings) == 1, (flag, by)
        if flag not in ("--output", "--help"):
            meanings = {text for _, text in by.values()}
            assert len(meanings) == 1, (flag, meanings)
    segment, train_segment = seen["--head"]["segment"][1], seen["--head"]["classify"][1]
    assert segment == train_segment and "head file" in segment            # a file everywhere, never a kind
    assert "--decoder" in seen and list(seen["--decoder"]) == ["train segment"]


@pytest.mark.parametrize("argv, field, value", [
    (["similar", "s.tif", "-o", "o.tif", "--at", "-13639635,4555275"], "at", (-13639635.0, 4555275.0)),
    (["similar", "s.tif", "-o", "o.tif", "--at", "-122.41,-37.77"], "at", (-122.41, -37.77)),
    (["segment", "s.tif", "-o", "o.tif", "--scale", "-1,60"], "scale", (-1.0, 60.0)),
    (["segment", "s.tif", "-o", "o.tif", "--nodata", "-9999"], "nodata", -9999.0),
    (["segment", "s.tif", "-o", "o.tif", "--scale", ".5,1"], "scale", (0.5, 1.0)),
])
def test_negative_values_follow_a_space(argv, field, value):
    assert getattr(parse(argv), field) == value


def test_a_negative_k_reaches_the_library_check(tmp_path, capsys):
    code = main(["cluster", "scene.tif", "-o", str(tmp_path / "u.tif"), "-k", "-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: -k: k must be a whole number from 2 to 254, got -3"]
