"""Test-only builders shared by several test modules (fixtures themselves are in tests/conftest.py)."""
