"""The outbound stack both front doors share: one per process and mesh (catalog, compiled chains,
backends, endpoint pools, health checks, counters)."""
