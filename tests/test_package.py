"""tests/README.md maps every module of the package to the test files that test it: no module
left out, no module or test file named that is not there."""

import pathlib
import re

TESTS = pathlib.Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "qstar_jax"


def table(readme: str) -> dict[str, list[str]]:
    """The README's table: module file -> the test files its row names (none for a module with
    nothing to test)."""
    rows = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and re.fullmatch(r"`\w+\.py`", cells[0]):
            rows[cells[0].strip("`")] = re.findall(r"`(test_\w+\.py)`", cells[1])
    return rows


def stale(readme: str, modules: set[str], test_files: set[str]) -> list[str]:
    """What the README gets wrong about the package and the tests, one line each."""
    rows = table(readme)
    named = set(re.findall(r"`(test_\w+\.py)`", readme))
    return ([f"{m}: not in the table" for m in sorted(modules - set(rows))] +
            [f"{m}: in the table, not in qstar_jax/" for m in sorted(set(rows) - modules)] +
            [f"{t}: named, not in tests/" for t in sorted(named - test_files)])


def test_the_table_names_every_module_and_only_test_files_that_exist():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    test_files = {p.name for p in TESTS.glob("test_*.py")}
    assert stale((TESTS / "README.md").read_text(encoding="utf-8"), modules, test_files) == []


def test_a_stale_table_is_caught():
    readme = ("| module | tested in |\n|---|---|\n| `a.py` | `test_a.py`, `test_gone.py` |\n"
              "| `old.py` | `test_a.py` |\n| `b.py` | nothing to test |\n")
    assert table(readme) == {"a.py": ["test_a.py", "test_gone.py"], "old.py": ["test_a.py"],
                             "b.py": []}
    assert stale(readme, {"a.py", "b.py", "new.py"}, {"test_a.py"}) == [
        "new.py: not in the table", "old.py: in the table, not in qstar_jax/",
        "test_gone.py: named, not in tests/"]
