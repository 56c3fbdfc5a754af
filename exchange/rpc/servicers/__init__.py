"""One servicer module per service: decode the request, call the use case, encode the result."""
