"""Security: the mesh CA, workload identities, join tokens."""
