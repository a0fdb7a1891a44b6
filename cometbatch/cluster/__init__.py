"""Running one manifest on a Ray cluster under one shared limit (ray is imported lazily)."""
