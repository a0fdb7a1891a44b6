"""The API over the network: the client, retry rules, the shared limiter and pacing."""
