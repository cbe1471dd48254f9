"""Shared SAE-ception library."""
