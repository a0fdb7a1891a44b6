"""The built-in simulated CometAPI: a real aiohttp server on loopback."""
