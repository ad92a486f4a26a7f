"""End-to-end tests: real pullmail nodes on loopback addresses (see harness.py)."""
