"""Preference pairs and prompt sets."""
