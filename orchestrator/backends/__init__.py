"""The backends: the `Gateway` and one `Backend` record each (config, slot queue, health, KV saves),
their health, the pool's conversation affinity, token counting and what runs where."""
