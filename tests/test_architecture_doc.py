"""docs/ARCHITECTURE.md keeps up with the tree: every wing, every entry script and every process-wide patch it lists
is still there, and nothing new of those kinds is missing from it."""

from __future__ import annotations

import re

from cogumi.core.paths import REPO_ROOT

DOC = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
SCRIPTS = REPO_ROOT / "scripts"


def test_every_wing_and_entry_script_is_on_the_map():
    wings = sorted(p.name for p in (SCRIPTS / "cogumi").iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert wings, "no wings found"
    missing = [w for w in wings if f"`cogumi.{w}`" not in DOC]
    entries = sorted(p.name for p in SCRIPTS.glob("*.py"))
    missing += [e for e in entries if e not in DOC]
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"


def test_every_class_patch_in_the_fast_path_is_listed_as_a_side_effect():
    source = (SCRIPTS / "cogumi" / "train" / "fastpath.py").read_text()
    patched = set(re.findall(r"^\s*modeling_llama\.(\w+(?:\.\w+)?) = ", source, flags=re.M))
    assert patched, "no class patches found: did fastpath change its form?"
    missing = [name for name in patched if name.split(".")[0] not in DOC]
    assert not missing, f"docs/ARCHITECTURE.md lists no side effect for modeling_llama.{missing}"
    assert "BOUNDS_ATTRIBUTE" in DOC and "per_row_rope" in DOC
