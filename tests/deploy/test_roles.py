"""Each role's settings are written three times: defaults/main.yml (the values), meta/argument_specs.yml
(what Ansible checks) and the README's table (what people read). They must say the same."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

ROLES = sorted(
    path.name for path in (REPO_ROOT / "roles").iterdir() if (path / "defaults" / "main.yml").exists()
)
# A cell may hold an escaped pipe (`\|`, Markdown's way to write one inside a table).
README_ROW = re.compile(r"^\|\s*`([a-z][a-z0-9_]*)`\s*\|\s*((?:\\\||[^|])*?)\s*\|", re.MULTILINE)


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def role_settings(role: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(defaults, argument_specs main options, README rows: name -> default cell)."""
    folder = REPO_ROOT / "roles" / role
    defaults = yaml.safe_load((folder / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((folder / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    readme = (folder / "README.md").read_text()
    return defaults, specs["main"]["options"], dict(README_ROW.findall(readme))


def _readme_value(cell: str) -> Any:
    text = cell.replace("\\|", "|").strip().strip("`")
    return yaml.safe_load(text) if text else ""


@pytest.mark.parametrize("role", ROLES)
def test_defaults_argument_specs_and_readme_name_the_same_settings(role: str) -> None:
    defaults, options, rows = role_settings(role)
    assert set(options) == set(defaults), (
        f"roles/{role}: only in defaults/main.yml: {sorted(set(defaults) - set(options))}; "
        f"only in meta/argument_specs.yml: {sorted(set(options) - set(defaults))}"
    )
    assert set(rows) >= set(defaults), (
        f"roles/{role}/README.md's table lacks {sorted(set(defaults) - set(rows))}"
    )
    stray = {name for name in rows if name.startswith(f"{role}_") or name.split("_")[0] == role.split("_")[0]}
    assert stray <= set(defaults), (
        f"roles/{role}/README.md documents unknown settings {sorted(stray - set(defaults))}"
    )


@pytest.mark.parametrize("role", ROLES)
def test_defaults_argument_specs_and_readme_give_the_same_values(role: str) -> None:
    defaults, options, rows = role_settings(role)
    wrong = []
    for name, value in defaults.items():
        spec = options.get(name, {})
        # A spec may leave a default out (Ansible then takes defaults/main.yml's); one it gives must match.
        if "default" in spec and spec["default"] != value:
            wrong.append(f"{name}: defaults {value!r}, argument_specs {spec['default']!r}")
        if name in rows and not _templated(value) and _readme_value(rows[name]) != value:
            wrong.append(f"{name}: defaults {value!r}, README {rows[name]}")
    assert not wrong, f"roles/{role} disagrees with itself:\n" + "\n".join(wrong)
