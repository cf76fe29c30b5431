"""What knows nothing of models: errors, atomic writes, statistics, progress, defaults, the runtime (device,
dtype, threads, quiet library output). The bottom layer: it imports no other loopcoder package."""
