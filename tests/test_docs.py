"""The README documents every setting and every command-line option the code has."""

from __future__ import annotations

from pathlib import Path

import click

from cometbatch import Settings
from cometbatch.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_settings_field_is_in_the_readme_table() -> None:
    """Each Settings field appears (in backticks) in the README's Settings section."""
    section = README[README.index("### Settings") : README.index("## Command line")]
    missing = [name for name in Settings.model_fields if f"`{name}`" not in section]
    assert missing == []


def test_every_command_and_option_is_in_the_readme() -> None:
    """Each CLI command and each of its long options is named in the README."""
    assert isinstance(main, click.Group)
    missing = []
    for name, command in main.commands.items():
        if f"cometbatch {name}" not in README:
            missing.append(name)
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--") and option not in README:
                    missing.append(f"{name} {option}")
    assert missing == []
