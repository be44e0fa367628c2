"""Helpers shared by the test modules: hand-written data files (`data`), toy batches (`toy`) and the real
127.0.0.1 deployment the end-to-end modules share (`deployment`). Import as `from helpers.data import ...`:
pytest puts tests/ on sys.path (tests/conftest.py has no package above it)."""
