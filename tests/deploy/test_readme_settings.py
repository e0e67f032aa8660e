"""The README's settings tables: a row for every setting of every service, as the settings classes say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mesh.kit.settings import mesh_settings_classes, variable_names

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "settings_table.py"


def test_every_setting_of_every_service_has_a_row_in_the_readme() -> None:
    """61 settings had no row (45 were documented nowhere): each field of each service's settings class is a
    row of the README's Configuration tables, under its variable name."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("## Deploying")]
    rows = set(re.findall(r"^\| `(MESH_[A-Z0-9_]+)`", section, flags=re.MULTILINE))
    missing = {
        f"{cls.__name__}.{field}"
        for cls in mesh_settings_classes()
        for field in cls.model_fields
        if variable_names(cls, field)[0] not in rows
    }
    assert missing == set()


def test_the_readme_settings_tables_are_what_the_script_writes() -> None:
    """Defaults and meanings come from the settings classes (field defaults and docstrings): a changed default
    or docstring, or a new setting, fails here until ``python scripts/settings_table.py`` is run."""
    checked = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert checked.returncode == 0, checked.stderr
