"""Storage: SQLAlchemy Core tables, engine setup for SQLite and PostgreSQL, and the queries."""
