"""Model capabilities and prices as data, and the registry that reads them."""
