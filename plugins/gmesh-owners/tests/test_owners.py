"""gmesh-owners through gmesh itself: loaded as an entry point, applied to a real etcd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


def gmesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=60)


def test_listed_by_gmesh_plugins(gmesh_env: dict[str, str]) -> None:
    out = gmesh("plugins", env=gmesh_env)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("owners "))
    assert "gmesh-owners" in row and "0.1.0" in row and "kind Owner" in row


def test_owner_is_validated_applied_and_listed(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "owner.yaml").write_text(
        "kind: Owner\nmetadata: {name: shop}\nspec:\n  team: Shop\n  contact: shop@example.com\n"
        "  services: [orders]\n"
    )
    refused = gmesh("apply", "-f", str(tmp_path / "owner.yaml"), env=gmesh_env)
    assert refused.returncode == 1
    assert f"{tmp_path / 'owner.yaml'}:6: Owner/shop: spec.services[0]: no Service 'orders'" in refused.stderr

    (tmp_path / "service.yaml").write_text("kind: Service\nmetadata: {name: orders}\n")
    applied = gmesh("apply", "-f", str(tmp_path), env=gmesh_env)
    assert applied.returncode == 0, applied.stderr
    listed = gmesh("owners", env=gmesh_env)
    assert listed.stdout.strip() == "orders\tShop <shop@example.com>"


def test_bad_contact_is_rejected_with_its_line(gmesh_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "owner.yaml").write_text(
        "kind: Owner\nmetadata: {name: shop}\nspec:\n  team: Shop\n  contact: nobody\n  services: [orders]\n"
    )
    out = gmesh("apply", "-f", str(tmp_path / "owner.yaml"), env=gmesh_env)
    assert out.returncode == 1
    assert "owner.yaml:5: Owner/shop: spec.contact: 'nobody' is not an e-mail address" in out.stderr
