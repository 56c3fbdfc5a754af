"""The hub's use cases, between the RPC edge and the store.

A servicer (exchange/rpc/servicers/) decodes a request, calls one function here and encodes what
it returns; a command validates nothing the edge already checked, runs its work through the hub —
writes through the group-commit writer with their idempotency record, reads in a transaction of
their own — and returns domain values (exchange/domain/models.py), never protobuf. The way of one
conversion, module by module, is drawn in docs/architecture.md.
"""
