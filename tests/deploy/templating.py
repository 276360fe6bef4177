"""A role's template rendered as Ansible's template module renders it (the same templating
engine, options and `ansible_managed`), in this process, from the role's defaults and vars plus
the given variables (as extra vars: they win). Fast enough for tests that render many times;
tests/deploy/test_nginx_rendering.py checks it against a real ansible-playbook run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_role_template(role_dir: Path, template: str, variables: dict[str, Any], dest: Path) -> str:
    """The text of role_dir/templates/<template> for a host with these variables."""
    # Ansible's own template action does these steps (ansible/plugins/action/template.py).
    from ansible._internal._templating import _template_vars
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    loader = DataLoader()
    values: dict[str, Any] = {}
    for source in ("defaults/main.yml", "vars/main.yml"):
        values.update(loader.load_from_file(str(role_dir / source), trusted_as_template=True))
    values["role_path"] = str(role_dir)
    values.update(variables)
    source = role_dir / "templates" / template
    values.update(
        _template_vars.generate_ansible_template_vars(
            path=str(source), fullpath=str(source), dest_path=str(dest), include_ansible_managed=True
        )
    )
    templar = Templar(loader=loader).copy_with_new_env(
        searchpath=[str(source.parent)], available_variables=values
    )
    return templar.template(
        trust_as_template(loader.get_text_file_contents(str(source))),
        escape_backslashes=False,
        overrides={"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"},
    )
