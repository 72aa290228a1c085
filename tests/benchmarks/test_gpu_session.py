"""benchmarks/gpu_session.sh on a CPU: the `first` plan (its dry run), its test list and its files."""

import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
FIRST_TESTS = ROOT / "benchmarks" / "first_tests.txt"


def dry_run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd="/",
                          env=env)


def first_test_ids():
    return [line.strip() for line in FIRST_TESTS.read_text().splitlines() if line.strip() and not line[0] == "#"]


def test_first_dry_run_prints_a_plan_within_eight_minutes(tmp_path):
    out = tmp_path / "out"
    proc = dry_run("first", "--dry-run", env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^   (\w+)\s+(\d+) s  (.+)$", proc.stdout, flags=re.M)
    names = [name for name, _, _ in steps]
    assert names == ["check", "build", "test", "bench", "table", "total"], proc.stdout
    caps = {name: int(seconds) for name, seconds, _ in steps}
    assert sum(caps[name] for name in names[:-1]) == caps["total"] <= 8 * 60
    assert "budget 480 s = 8 min" in proc.stdout
    bench = dict((name, what) for name, _, what in steps)["bench"]
    for runner in ("engine", "reference", "compile", "compile-ro"):
        assert f" {runner}" in bench
    assert "--variants b0 b5" in bench and "--resolutions ade" in bench
    assert f"pytest {len(first_test_ids())} node ids" in proc.stdout
    assert not out.exists(), "the dry run wrote something"


def test_first_writes_at_most_eight_files():
    proc = dry_run("first", "--dry-run")
    files = re.search(r"files under \$OUT: (.+)$", proc.stdout, flags=re.M).group(1).split()
    assert 0 < len(files) <= 8 and len(set(files)) == len(files)
    text = SCRIPT.read_text()
    for name in files:  # every file the plan names is one the script writes
        stem = name.rsplit(".", 1)[0]
        assert f'"$OUT/{name}"' in text or f'$OUT/{stem}' in text or f"run_stage {stem} " in text, name


def test_dry_run_of_other_stages_runs_nothing(tmp_path):
    env = {"OUT": str(tmp_path / "o"), "PATH": "/usr/bin:/bin"}
    proc = dry_run("bench-cityscapes", "kernels", "--dry-run", env=env)
    assert proc.returncode == 0 and "== bench-cityscapes" in proc.stdout and "== kernels" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_every_stage_after_check_installs_what_it_needs():
    text = SCRIPT.read_text()
    for stage in ("test", "bench-ade", "bench-cityscapes", "paper", "kernels", "ceilings"):
        body = re.search(rf"^        {re.escape(stage)}\)\n(.*?);;", text, flags=re.M | re.S)
        assert body, stage
        assert "ensure_installed" in body.group(1), f"stage {stage} does not install the package first"


def test_first_test_ids_exist():
    """Every node id of benchmarks/first_tests.txt is collected (a renamed test would silently drop out)."""
    ids = first_test_ids()
    assert len(ids) >= 10
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run([str(pytest_bin), "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    for node in ids:
        assert any(line == node or line.startswith(node + "[") for line in collected), node
