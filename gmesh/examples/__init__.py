"""Example services used by the README tour and `gmesh demo`."""
