"""Config resources: typed kinds, YAML loading with line numbers, validation, schema, diff and apply."""
