"""Placeholder: rules are added here."""
