"""Built-in gmesh plugins.

Each module registers through the `gmesh` entry-point group, exactly like a third-party plugin.
"""
