"""Expert placement algorithms: dsc's search, DeepSeek's EPLB baseline, lower bounds (DESIGN.md §6)."""
