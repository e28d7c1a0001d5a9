"""The drivers behind each CLI verb (compile, verify, inspect, profile, quantization report)."""
