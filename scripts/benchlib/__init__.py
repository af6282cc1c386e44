"""scripts/bench's modes and the core they share (issue 13)."""
