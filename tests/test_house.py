"""The house rules a newcomer relies on, read from the tree itself (AST and text, nothing imported or run):

- no module under scripts/ imports an entry script (scripts/*.py, scripts/bench/*.py) or a private (_name) of
  another project module; entry scripts are the top of the house, the library is shared below them;
- no source file is over MAX_LINES lines unless it says why in a line `# long-file: <reason>` (the marker
  convention: the reason names what would be lost by splitting it);
- comments and docs cite ISSUES_LOG entries (O2, B7), not issue numbers nobody reading the repo can look up, and
  name no path outside the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from cogumi.core.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"
LIBRARY = SCRIPTS / "cogumi"
ENTRY_SCRIPTS = sorted([*SCRIPTS.glob("*.py"), *(SCRIPTS / "bench").glob("*.py")])
ENTRY_NAMES = {path.stem for path in ENTRY_SCRIPTS}
MAX_LINES = 450
LONG_FILE = re.compile(r"^\s*#\s*long-file:\s*\S.{8,}")  # a reason, not just the marker
PROJECT_FILES = [*SCRIPTS.rglob("*.py"), *SCRIPTS.rglob("*.sh"), *(REPO_ROOT / "tests").glob("*.py"),
                 REPO_ROOT / "Makefile"]


def module_name(path: Path) -> str:
    """scripts/cogumi/train/trainer.py -> cogumi.train.trainer; scripts/bench/bench_train.py -> bench_train."""
    if path.is_relative_to(LIBRARY):
        parts = path.relative_to(SCRIPTS).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return path.stem


def is_project(name: str) -> bool:
    return name == "cogumi" or name.startswith("cogumi.") or name in ENTRY_NAMES


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def import_problems(source: str, here: str) -> list[str]:
    """Imports of entry scripts, and private names taken from other project modules, in the module `here`."""
    tree = ast.parse(source, filename=here)
    problems, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ENTRY_NAMES:
                    problems.append(f"line {node.lineno}: imports the entry script {alias.name}")
                if is_project(alias.name):
                    module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and is_project(node.module):
            if node.module.split(".")[0] in ENTRY_NAMES:
                problems.append(f"line {node.lineno}: imports from the entry script {node.module}")
            for alias in node.names:
                if is_private(alias.name) and node.module != here:
                    problems.append(f"line {node.lineno}: imports the private {node.module}.{alias.name}")
                # `from cogumi.train import trainer` binds a module: its attributes are checked below.
                module_aliases.setdefault(alias.asname or alias.name, f"{node.module}.{alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and module_aliases[node.value.id] != here):
            problems.append(f"line {node.lineno}: uses the private {module_aliases[node.value.id]}.{node.attr}")
    return problems


def test_the_walk_finds_the_library_and_the_entry_scripts():
    # Guards the test itself: an empty glob would pass every check below.
    modules = {module_name(p) for p in SCRIPTS.rglob("*.py")}
    assert {"cogumi.core.config", "cogumi.train.trainer", "cogumi.evaluate.validate"} <= modules
    assert {"benchmark", "train_phase1a_fullprecision", "merge_adapter_fullprecision", "bench_merge"} <= ENTRY_NAMES


def test_the_import_check_catches_what_it_is_for():
    source = ("import benchmark\nfrom train_phase1a_fullprecision import main\n"
              "from cogumi.train.trainer import _wrap\nfrom cogumi.train import trainer\nx = trainer._wrap\n"
              "from cogumi.core import config\ny = config.load_config\nfrom cogumi.train.probe import _own\n")
    found = import_problems(source, "cogumi.train.probe")
    assert len(found) == 4, found
    assert "line 1: imports the entry script benchmark" in found
    assert "line 5: uses the private cogumi.train.trainer._wrap" in found


@pytest.mark.parametrize("path", sorted(SCRIPTS.rglob("*.py")), ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_no_module_imports_an_entry_script_or_a_private_name_of_another(path):
    assert import_problems(path.read_text(encoding="utf-8"), module_name(path)) == []


def test_no_file_is_over_the_line_limit_unless_it_says_why():
    too_long = []
    for path in PROJECT_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(LONG_FILE.match(line) for line in lines[:40]):
            too_long.append(f"{path.relative_to(REPO_ROOT)}: {len(lines)} lines")
    assert len(PROJECT_FILES) > 50
    assert too_long == [], (f"split by responsibility, or say why in a `# long-file: <reason>` line near the top: "
                            f"{too_long}")


ISSUE_NUMBER = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
OUTSIDE_PATH = re.compile(r"\.\./shared|/work/")
TEXT_FILES = [*PROJECT_FILES, REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"),
              *(REPO_ROOT / "configs").rglob("*.yaml"), *(REPO_ROOT / "requirements").glob("*.in")]


def test_comments_cite_issues_log_entries_and_no_path_outside_the_repo():
    found = []
    for path in TEXT_FILES:
        if path == Path(__file__):
            continue  # this file names the patterns it looks for
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ISSUE_NUMBER.search(line) or OUTSIDE_PATH.search(line):
                found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert len(TEXT_FILES) > 60
    assert found == [], "cite ISSUES_LOG entries (e.g. ISSUES_LOG O2) and repo paths only:\n" + "\n".join(found)


def make_help_targets() -> list[str]:
    out = subprocess.run(["make", "-s", "help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return re.findall(r"^  make (\S+)", out, re.MULTILINE)


def test_every_make_help_target_is_in_the_readme_and_every_documented_target_exists():
    targets = make_help_targets()
    assert {"setup", "demo", "train", "merge", "validate", "test", "test-fast", "gpu-wheels"} <= set(targets)
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    # Named as a command: in backticks, or at the start of a line in a shell block.
    assert [t for t in targets if not re.search(rf"(?:`|^)make {re.escape(t)}(?![\w-])", readme, re.MULTILINE)] == []
    documented = set()
    for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"), *(REPO_ROOT / "configs").glob("*.yaml")]:
        documented |= set(re.findall(r"(?:`|^\s*)make ([a-z][a-z-]*[a-z])(?![\w*-])", path.read_text(encoding="utf-8"),
                                     re.MULTILINE))
    assert {"train", "merge", "validate"} <= documented
    assert documented - set(targets) == set()


def test_every_repo_path_the_docs_name_exists():
    # A path cut at a placeholder (configs/phase<PHASE>.yaml) is not a path.
    repo_path = re.compile(r"\b((?:scripts|configs|tests|requirements|docs)/[\w./-]*\w)(?![\w./<{-])")
    named = set()
    for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]:
        named |= set(repo_path.findall(path.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (REPO_ROOT / p).exists())
    assert len(named) > 10
    assert missing == []


def test_no_test_module_imports_another():
    tests = REPO_ROOT / "tests"
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith(("test_", "conftest"))]
    assert found == [], "share fixtures through conftest.py and helpers through a helper module"


def test_tests_take_the_repository_paths_from_cogumi_core_paths():
    # One definition of the repository root (cogumi.core.paths.REPO_ROOT); only conftest.py finds scripts/ from its
    # own place, to put it on sys.path.
    own = re.compile(r"Path\(__file__\)|os\.path\.dirname\(__file__\)")
    tests = [p for p in (REPO_ROOT / "tests").glob("*.py") if p.name != "conftest.py" and p != Path(__file__)]
    assert len(tests) > 20
    assert [p.name for p in tests if own.search(p.read_text(encoding="utf-8"))] == []
