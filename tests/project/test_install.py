"""Installing and importing next to other packages: the repository's folders never shadow an installed package of
the same name (kernels/ against Hugging Face's ``kernels``, a dependency of transformers >= 5.25), from the
repository root included, and the editable install works again in an environment that already holds such a package.
"""

import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from segformer_fast import Segformer

from helpers import ROOT

#: What a copy of the project for an install needs (no .git, venv, build or compiled files).
PROJECT_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "__pycache__", "*.egg-info", ".pytest_cache",
                                        "tests", "benchmarks")


def run_python(code: str, cwd: Path, *, python: str = sys.executable, env_path: Path | None = None, timeout=300):
    """``python -c code`` in ``cwd`` (so the folder is sys.path[0], as for any python started there), with
    ``env_path`` on PYTHONPATH (after it)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HUB_OFFLINE": "1"}
    if env_path is not None:
        env["PYTHONPATH"] = str(env_path)
    return subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_kernels_distribution(folder: Path, marker: str) -> Path:
    """A tiny distribution whose top-level package is ``kernels`` and which, as Hugging Face's does, registers a
    setuptools ``egg_info.writers`` entry point in it (every setuptools build then imports ``kernels``)."""
    package = folder / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"MARKER = {marker!r}\n")
    (package / "_writers.py").write_text("def write_nothing(cmd, basename, filename):\n    pass\n")
    (folder / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "segformer-fast-test-kernels"
        version = "1.0"

        [project.entry-points."egg_info.writers"]
        "segformer_fast_test_probe.txt" = "kernels._writers:write_nothing"

        [tool.setuptools]
        packages = ["kernels"]
    """))
    return folder


def test_repository_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    """A python started in the clone has the root first on sys.path: ``import kernels`` is still the installed
    package, and the project's kernels are ``segformer_fast.kernels``."""
    installed = tmp_path / "site"
    (installed / "kernels").mkdir(parents=True)
    (installed / "kernels" / "__init__.py").write_text("MARKER = 'installed'\n")
    result = run_python("""
        import sys
        assert sys.path[0] == "", sys.path[:2]
        import kernels
        print(kernels.MARKER, kernels.__file__)
        import segformer_fast.kernels.common as common
        print(common.__name__)
    """, ROOT, env_path=installed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "installed", result.stdout
    assert result.stdout.split()[-1] == "segformer_fast.kernels.common", result.stdout


def test_transformers_drop_in_from_the_repository_root():
    """transformers (which imports Hugging Face's ``kernels`` from 5.25 on) and the drop-in, run from the clone."""
    pytest.importorskip("transformers")
    result = run_python("""
        import torch
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
        import segformer_fast
        torch.manual_seed(0)
        model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=3)).eval()  # MiT-B0
        engine = segformer_fast.optimize(model)
        pixels = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            expected = model(pixel_values=pixels).logits
        got = engine(pixel_values=pixels).logits
        print(float((got - expected).abs().max() / expected.abs().max()))
    """, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) <= 1e-5, result.stdout


def test_cli_transformers_engine_from_the_repository_root(tmp_path):
    """``python -m segformer_fast segment --engine transformers`` run in the clone finds transformers."""
    pytest.importorskip("transformers")
    Segformer.from_config("b0", num_labels=4, seed=1).save_pretrained(tmp_path / "ckpt")
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-m", "segformer_fast", "segment", str(tmp_path / "a.png"), "--model", str(tmp_path / "ckpt"),
         "--out", str(tmp_path / "out"), "--engine", "transformers", "--size", "64", "64", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "out" / "a_labels.png").is_file()


def test_editable_install_beside_a_package_named_like_a_project_folder(tmp_path):
    """The editable install (twice: the second is what any change to setup.py makes `make install` do) into an
    environment that holds a ``kernels`` distribution registering an ``egg_info.writers`` entry point: setuptools
    imports ``kernels`` during the build, and it must be that distribution, never the project's folder."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=PROJECT_IGNORE, symlinks=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # this environment's packages (pip, setuptools, torch) behind the new venv's own site-packages, less any other
    # `kernels` distribution (Hugging Face's, whose entry points would then point into the probe) and the project
    outer = tmp_path / "outer"
    outer.mkdir()
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir():
            name = entry.name.lower()
            if not (name == "kernels" or name.startswith(("kernels-", "segformer_fast", "__editable__"))):
                (outer / entry.name).symlink_to(entry)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "outer.pth").write_text(f"{outer}\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "SEGFORMER_FAST_SKIP_EXT": "1",
           "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def pip_install(*args):
        return subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    probe = pip_install(str(write_kernels_distribution(tmp_path / "probe", "probe")))
    assert probe.returncode == 0, probe.stderr[-3000:]
    for attempt in ("first install", "re-install"):
        result = pip_install("-e", str(project))
        assert result.returncode == 0, f"{attempt}: {result.stderr[-3000:]}"
        assert "kernels._" not in result.stderr, result.stderr[-3000:]
    check = run_python("""
        import kernels
        import segformer_fast.kernels.common as common
        print(kernels.MARKER, common.__file__)
    """, tmp_path, python=python)
    assert check.returncode == 0, check.stderr[-3000:]
    marker, common_file = check.stdout.split()
    assert marker == "probe"
    assert Path(common_file).resolve() == (project / "kernels" / "common.py").resolve()


def test_build_without_torch_says_what_to_do_in_one_line():
    """An isolated build (pip's default) sees no torch: setup.py ends with one line naming the command that works,
    not a traceback ending in ``No module named 'torch'``."""
    script = textwrap.dedent("""
        import runpy, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError("No module named 'torch'", name="torch")
        sys.meta_path.insert(0, NoTorch())
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "pip install --no-build-isolation" in lines[0] and "install torch first" in lines[0], lines[0]
