"""Composition methods, one module each, all behind the interface in `composers.base`."""
