"""The hub's domain core: plain values, rules and typed errors. Knows neither gRPC nor SQL."""
