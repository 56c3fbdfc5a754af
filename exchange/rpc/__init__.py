"""The gRPC edge: server factory, authentication, the status table and thin servicers."""
