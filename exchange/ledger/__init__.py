"""The hub's use cases over one open transaction: merchants, keys, members, points, linking.

Each function takes a SQLAlchemy Connection the caller owns (and commits), plain values, and the
current time; it returns plain values or raises a domain error. No gRPC here.
"""
