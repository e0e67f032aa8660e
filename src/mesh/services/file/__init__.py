"""File service: validated uploads, a content-addressed blob store, metadata in PostgreSQL."""
