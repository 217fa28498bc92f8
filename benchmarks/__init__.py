"""Benchmarks: tenantpool against its peers, measured in the same run on the same server."""
