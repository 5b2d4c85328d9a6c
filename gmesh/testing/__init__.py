"""gmesh's test kit for the project and for plugin authors: real etcd members and clusters,
Echo upstream servers, and the pytest fixtures built on them (`gmesh.testing.pytest_plugin`)."""

from gmesh.testing.etcd import EtcdCluster, EtcdMember, cluster, single_member

__all__ = ["EtcdCluster", "EtcdMember", "cluster", "single_member"]
