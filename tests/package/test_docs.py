"""The install guide leads with the Debian package, and says what test_deb.py
does (no root or mirror needed here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_install_guide_leads_with_the_package() -> None:
    guide = (REPO / "deploy" / "README.md").read_text()
    sections = re.split(r"^## ", guide, flags=re.MULTILINE)
    first = sections[1]
    assert first.startswith("Install from the Debian package\n"), first.splitlines()[0]
    # In the order test_deb.py installs it.
    steps = [
        "make deb",
        "apt-get install -y postgresql-common",
        "create_main_cluster = false",
        "dpkg -i failoverd_",
        "apt-get -f install",
    ]
    positions = [first.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions), dict(zip(steps, positions, strict=True))
    for path in ("/usr/bin/failoverd", "/lib/systemd/system/failoverd.service", "/usr/share/doc/failoverd/examples/"):
        assert path in first, path


def test_make_deb_runs_the_build_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^deb:.*\n\t(.*)$", makefile, re.MULTILINE)
    assert recipe is not None, "no deb target"
    assert recipe[1] == "$(PYTHON_SYSTEM) packaging/build_deb.py"
    assert re.search(r"^\.PHONY:.*\bdeb\b", makefile, re.MULTILINE)
    assert re.search(r"^test:.*\bpackage-tools\b", makefile, re.MULTILINE)
