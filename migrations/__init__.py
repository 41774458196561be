"""Alembic migrations of the broker's schema (``broker db upgrade`` runs them)."""
