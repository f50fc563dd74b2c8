"""Model Zoo checks run as MONAI's tools run them: metadata schema, network in/out, TorchScript export."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, REPO, TINY_NET_ARGS

from nisf_monai.networks import NISFNet

SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"


def bundle_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.skipif(
    not SCHEMA.is_file(), reason=f"MONAI's metadata schema not found at {SCHEMA} (offline copy in shared/monai)"
)
def test_metadata_validates_against_monai_schema(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # verify_metadata downloads the schema unless the file already exists
    out = bundle_command(
        "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"), "--filepath", str(schema), cwd=tmp_path
    )
    assert "metadata is verified with no error" in out.stdout + out.stderr


def test_verify_net_in_out_passes(tmp_path: Path) -> None:
    out = bundle_command(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "inference.json"),
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    assert "data shape of network is verified with no error" in out.stdout + out.stderr


def test_ckpt_export_torchscript_matches_eager(tmp_path: Path) -> None:
    """model.pt (a plain state_dict) exports with ckpt_export; the TorchScript module gives the eager outputs."""
    torch.manual_seed(0)
    net = NISFNet(latent_dim=16, hidden_dim=16, num_layers=2).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    bundle_command(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(tmp_path / "model.pt"),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "inference.json"),
        *TINY_NET_ARGS,
        cwd=tmp_path,
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    coords = torch.rand(2, 3, 6, 5, 4) - 0.5
    latent = torch.randn(2, 16) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(exported(coords), net(coords), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(coords, latent), net(coords, latent), rtol=1e-5, atol=1e-6)


def test_one_version_for_package_and_bundle() -> None:
    """pyproject, the package, the bundle's metadata and its pin of the package name one version."""
    import json
    import re

    import nisf_monai

    pyproject = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert (
        pyproject
        == nisf_monai.__version__
        == metadata["version"]
        == metadata["required_packages_version"]["nisf-monai"]
    )
    assert pyproject in metadata["changelog"]
