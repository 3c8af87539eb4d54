"""The package as pip installs it, away from the checkout: a wheel in a fresh venv finds its presets,
experiments and DeepSpeed JSONs inside itself (slow tier: it builds and installs a wheel)."""

import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_wheel_in_a_fresh_venv_runs_config_and_a_tiny_run_from_packaged_presets(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ beside setup.py, not in the checkout
    shutil.copytree(ROOT / "reasonedit", source / "reasonedit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--disable-pip-version-check", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("reasonedit-*.whl")
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "--target", site, str(wheel)], check=True)
    # the dependencies (torch, transformers, ...) from this venv, appended after the fresh site-packages;
    # this venv's editable reasonedit is not on that path (its finder is a .pth hook, not processed there)
    with open(f"{site}/zz_dependencies.pth", "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        return subprocess.run([str(python), *args], cwd=elsewhere, capture_output=True, text=True, timeout=600)

    where = run("-c", "import reasonedit, reasonedit.config as c; print(reasonedit.__file__); "
                      "print(sorted(p.name for p in c.PACKAGE_CONFIGS.rglob('*') if p.is_file()))")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(site), where.stdout  # the installed copy, not the checkout
    assert "zero2.json" in where.stdout and "tiny.yaml" in where.stdout and "shapes_demo.yaml" in where.stdout

    shown = run("-m", "reasonedit", "config", "shapes_tiny", "data.n=2")
    assert shown.returncode == 0, shown.stderr
    assert "name: shapes_tiny" in shown.stdout and "vocab_size" in shown.stdout  # the model preset merged

    out = elsewhere / "run"
    done = run("-m", "reasonedit", "run", "shapes_tiny", f"output_dir={out}", "data.n=2", "data.shard_size=2",
               "steps=[data,models]")
    assert done.returncode == 0, done.stderr
    assert (out / "data" / "manifest.json").is_file() and (out / "model" / "reasonedit.json").is_file()

    missing = run("-m", "reasonedit", "config", "no_such_experiment")
    packaged = sorted(p.stem for p in (ROOT / "reasonedit" / "configs" / "experiment").glob("*.yaml"))
    assert missing.returncode == 1 and f"packaged: {packaged}" in missing.stderr
