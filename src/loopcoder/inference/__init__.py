"""Serving a model: the scheduler (`engine`), sampling and its constraints, detokenising (`textstream`), and
the engine's K/V cache (`kv`: the block pool, the tensor stores)."""
