"""Every Python file of the project is at most 400 lines (docs/DESIGN.md section 2): the package's modules, the
Triton kernels, the benchmarks and their harness, and the tests. A file that grows past it is split by what it holds,
never given a cap of its own."""

import pytest

from helpers import ROOT

MAX_LINES = 400
#: The folders whose Python files the rule covers (segformer_fast/kernels is a link to kernels/, counted there).
FOLDERS = ("segformer_fast", "kernels", "benchmarks", "tests")


def long_files(root, folder: str) -> dict:
    """{path relative to ``root``: lines} of the Python files under ``root / folder`` longer than MAX_LINES."""
    linked = root / "segformer_fast" / "kernels"
    files = [path for path in (root / folder).rglob("*.py")
             if "__pycache__" not in path.parts and not path.is_relative_to(linked)]
    assert files, f"no Python files found under {folder}/"
    lines = {str(path.relative_to(root)): len(path.read_text(encoding="utf-8").splitlines()) for path in files}
    return {path: count for path, count in sorted(lines.items()) if count > MAX_LINES}


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_python_file_is_longer_than_the_limit(folder):
    found = long_files(ROOT, folder)
    assert not found, f"files over {MAX_LINES} lines (split them by what they hold): {found}"


def test_the_rule_counts_lines_as_it_says(tmp_path):
    """A file of MAX_LINES + 1 lines is reported, one of MAX_LINES is not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "fits.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path, "pkg") == {"pkg/long.py": MAX_LINES + 1}
