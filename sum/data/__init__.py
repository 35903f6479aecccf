"""Data: acquisition, formats, the embedded procedural world, validation (spec §3)."""
