"""``selfspec new-domain NAME``: a plugin package that completes a run as it is, for the author to fill in.

The files are ``authoring/template/**/*.tmpl`` with ``$name`` (the domain), ``$module``, ``$package``
and ``$dist`` substituted; ``package/`` becomes the Python package and ``test_plugin.py`` the test
module. The folder is assembled under a temporary name and renamed into place, so a failed
scaffold leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from string import Template

from selfspec_core.errors import SelfspecError

TEMPLATE_ROOT = "template"


def scaffold_domain(name: str, dest: Path) -> Path:
    """Create ``dest/selfspec-NAME/``: pyproject, README, hooks, seeds, evaluation file, corpus, tests."""
    module = name.replace("-", "_").replace(".", "_").lower()
    fields = {"name": name, "module": module, "package": f"selfspec_{module}", "dist": f"selfspec-{name}"}
    folder = Path(dest) / fields["dist"]
    if folder.exists():
        raise SelfspecError(f"{folder} already exists; pick another name or --dest")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        root = Path(str(files("selfspec_core.authoring") / TEMPLATE_ROOT))
        for source in sorted(root.rglob("*.tmpl")):
            target = staging / _target_path(source.relative_to(root), fields)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(Template(source.read_text(encoding="utf-8")).substitute(fields), encoding="utf-8")
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _target_path(relative: Path, fields: dict) -> Path:
    parts = [fields["package"] if part == "package" else part for part in relative.with_suffix("").parts]
    if parts[-1] == "test_plugin.py":
        parts[-1] = f"test_{fields['module']}.py"
    return Path(*parts)
