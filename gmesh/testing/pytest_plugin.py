"""gmesh's pytest plugin, loaded automatically wherever gmesh is installed.

Fixtures (all real: processes, sockets, no fakes):

- `etcd_server` (session): one etcd member shared by the session's tests.
- `mesh_keys`: a key prefix of the test's own, so tests sharing `etcd_server` never meet.
- `gmesh_env`: environment (GMESH_ETCD, GMESH_PREFIX, GMESH_DATA_DIR) pointing gmesh commands
  and `gmesh.register` at `etcd_server` and `mesh_keys`; also returned as a dict for subprocesses.
- `etcd_member`: a private one-member etcd to stop, kill and restart.
- `etcd_cluster`: a private 3-member cluster.
- `store` (async): a `Store` connected to `etcd_server`.
- `echo_server` (async): a running Echo upstream on 127.0.0.1 (health and reflection on).
- `config_kinds`: every config kind the installed plugins give.

Async fixtures need pytest-asyncio (`pip install gmesh[testing]`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gmesh.config.kinds import KindRegistry
from gmesh.discovery.keys import MeshKeys
from gmesh.testing.etcd import EtcdCluster, EtcdMember, cluster, single_member

try:
    import pytest_asyncio

    HAVE_PYTEST_ASYNCIO = True
except ImportError:  # pragma: no cover - async fixtures need the testing extra
    HAVE_PYTEST_ASYNCIO = False


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    member = single_member(tmp_path_factory.mktemp("etcd-server"))
    member.start()
    yield member
    member.stop()


@pytest.fixture
def mesh_keys() -> MeshKeys:
    return MeshKeys(f"/gmesh-test/{uuid.uuid4().hex[:12]}/")


@pytest.fixture
def gmesh_env(
    etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    values = {
        "GMESH_ETCD": etcd_server.url,
        "GMESH_PREFIX": mesh_keys.prefix,
        "GMESH_DATA_DIR": str(tmp_path / "gmesh-data"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def etcd_member(tmp_path: Path) -> Iterator[EtcdMember]:
    member = single_member(tmp_path)
    member.start()
    yield member
    member.kill()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    members = cluster(tmp_path, 3)
    members.start()
    yield members
    for member in members.members:
        member.kill()


@pytest.fixture(scope="session")
def config_kinds() -> KindRegistry:
    from gmesh.pluginmanager import Plugins

    return Plugins.load().config_kinds()


if HAVE_PYTEST_ASYNCIO:
    from gmesh.store.etcd import EtcdConfig, Store
    from gmesh.testing.echo import EchoServer, start_echo_server

    @pytest_asyncio.fixture
    async def store(etcd_server: EtcdMember) -> AsyncIterator[Store]:
        connected = await Store.connect(EtcdConfig.parse(etcd_server.url))
        yield connected
        await connected.close()

    @pytest_asyncio.fixture
    async def echo_server() -> AsyncIterator[EchoServer]:
        server = await start_echo_server("echo")
        yield server
        await server.stop(None)
