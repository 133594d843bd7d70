"""Every guard and test that ISSUES_LOG.md names still exists: the log cannot promise protection that is gone."""

import re
from pathlib import Path

from cogumi.core.paths import REPO_ROOT

REFERENCE = re.compile(r"`((?:scripts|tests)/[\w/.-]+\.(?:py|sh))(?:::(\w+))?`")


def references() -> list[tuple[str, str | None]]:
    return REFERENCE.findall((REPO_ROOT / "ISSUES_LOG.md").read_text(encoding="utf-8"))


def defines(path: Path, name: str) -> bool:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".sh":
        return re.search(rf"^{name}\(\)\s*\{{", text, re.M) is not None
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", text, re.M) is not None


def test_the_log_names_guards_and_tests_for_each_origin_incident():
    text = (REPO_ROOT / "ISSUES_LOG.md").read_text(encoding="utf-8")
    origin = text.split("## Origin incidents", 1)[1].split("## Incidents while building", 1)[0]
    sections = origin.split("\n### ")[1:]
    assert len(sections) == 3
    for section in sections:
        assert "**Guards.**" in section and "**Tests.**" in section, section[:80]
        named_tests = [name for path, name in REFERENCE.findall(section.split("**Tests.**", 1)[1]) if name]
        assert named_tests, f"no test named for: {section.splitlines()[0]}"


def test_every_named_file_and_function_exists():
    refs = references()
    assert len(refs) > 15
    missing = []
    for rel, name in refs:
        path = REPO_ROOT / rel
        if not path.exists():
            missing.append(rel)
        elif name and not defines(path, name):
            missing.append(f"{rel}::{name}")
    assert not missing, f"ISSUES_LOG.md names what no longer exists: {missing}"
