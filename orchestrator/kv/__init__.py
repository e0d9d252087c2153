"""The KV store: saves of a slot's cache on disk, their folder and bounds, the identity of the server
that wrote each one, and why a turn's prompt missed the cache."""
