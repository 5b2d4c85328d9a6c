"""The standalone proxy: `gmesh proxy` (inbound server, relay, admin port, lifecycle)."""
