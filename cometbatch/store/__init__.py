"""Where images go: the storage seam, the sink that checks and writes them."""
