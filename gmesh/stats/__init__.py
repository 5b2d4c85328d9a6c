"""Counters of the calls a process makes, per mesh, and their publication to etcd."""
