"""Service discovery: the etcd key layout, endpoint records, registrations and the catalog."""
