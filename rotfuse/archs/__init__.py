"""Architecture knowledge, loaded from the YAML specs in configs/archs/."""
