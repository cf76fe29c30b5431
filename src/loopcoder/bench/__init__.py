"""Benchmarks (`loopcoder bench decode|train|serve`): `settings` (their settings, importable without
torch, so the command line shows their defaults quickly), `common` (what they share), one module each."""
