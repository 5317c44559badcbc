"""The shapes world: a procedurally rendered domain, its judge, and the bundled default model."""
