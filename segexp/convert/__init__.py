"""Converters from public checkpoint layouts to segexp state dicts."""
