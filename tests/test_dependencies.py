"""Dependencies declared where they are used: the bundle's training and inference run with the core install alone.

A package that only an extra installs (the ``label`` extra, the test tools) but that a run imports would work in CI,
which installs the extras, and fail for a user who ran ``pip install -e .``. Here the runs go through an import
guard that refuses every installed package outside the closure of the core dependencies, so such a package fails
the test instead.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

from helpers import REPO, TINY_NET_ARGS, bundle_command, run_command

from nisf_monai.data.synthetic import generate_cohort

_GUARD = """
import json, runpy, sys
refused = set(json.loads(sys.argv[1]))
class CoreOnly:  # wraps each finder: a refused package is not found, as if it were not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in refused:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)
assert not refused & set(sys.modules), "imported before the guard"
sys.meta_path[:] = [CoreOnly(finder) for finder in sys.meta_path]
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s;\[<>=!~(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _core_closure() -> set[str]:
    """Distributions the core install brings: nisf-monai's requirements without extras, and theirs, recursively."""
    found, todo = set(), ["nisf-monai"]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r and "extra==" not in r]
    return found


def _refused_modules() -> list[str]:
    """Top-level modules installed here by distributions outside the core closure."""
    core = _core_closure()
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(d.lower().replace("_", "-") in core for d in dists) and module.isidentifier()
    )


def test_core_dependencies_are_declared_in_pyproject_and_metadata() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    core = [
        _name(r) for r in re.findall(r'^\s+"([^"]+)",', pyproject.split("[project.optional-dependencies]")[0], re.M)
    ]
    listed = json.loads((REPO / "bundle/configs/metadata.json").read_text())["required_packages_version"]
    own_fields = {"torch", "monai", "numpy"}  # metadata.json has pytorch_version, monai_version, numpy_version
    assert "scikit-image" in core  # the largest-component step of every inference imports it
    assert sorted(set(core) - own_fields - set(listed)) == []


def test_training_and_inference_run_with_the_core_install_alone(tmp_path: Path) -> None:
    refused = _refused_modules()
    assert "pytest" in refused  # the guard refuses something real: at least the test tools
    data = generate_cohort(str(tmp_path / "cohort"), num_subjects=2, shape=(24, 24, 4), spacing=(4.0, 4.0, 10.0))
    root = tmp_path / "bundle"
    runs = [
        ("training", "train.json", "--datalist", data, "--max_epochs", "1", "--num_points", "128"),
        ("inference", "inference.json", "--dataset_dir", str(Path(data).parent), "--inference_steps", "2"),
    ]
    for run_id, config, *overrides in runs:
        command = bundle_command(run_id, config, root, *overrides, *TINY_NET_ARGS)
        guarded = [sys.executable, "-c", _GUARD, json.dumps(refused), *command[command.index("run") :]]
        result = run_command(guarded, tmp_path, timeout=600, OMP_NUM_THREADS="1")
        assert result.returncode == 0, f"{run_id} needs more than the core install:\n{result.stderr[-3000:]}"
    assert sorted(p.name for p in (root / "eval").glob("*_seg.nii.gz"))
