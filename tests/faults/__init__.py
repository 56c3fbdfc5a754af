"""Fault suites: hubs killed mid-traffic, retry storms and double spends, against real hub processes."""
