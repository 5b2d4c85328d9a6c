"""etcd access for gmesh: the `Store` interface and the embedded single-member etcd."""

from gmesh.store.connect import open_store, resolve_etcd
from gmesh.store.etcd import (
    Compare,
    Delete,
    EtcdConfig,
    Event,
    EventType,
    KeyValue,
    Put,
    Resync,
    Store,
    TxnResult,
    WatchBatch,
    WatchItem,
    WatchLost,
)

__all__ = [
    "Compare",
    "Delete",
    "EtcdConfig",
    "Event",
    "EventType",
    "KeyValue",
    "Put",
    "Resync",
    "Store",
    "TxnResult",
    "WatchBatch",
    "WatchItem",
    "WatchLost",
    "open_store",
    "resolve_etcd",
]
