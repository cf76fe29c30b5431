"""The engine's K/V cache: `block_pool` (block bookkeeping and the prefix index, no tensors), `store` (the
preallocated slot cache's tensors) and `paged` (its full stores in blocks, the prefix cache)."""
