"""Attention processors, region masks and attention-map stores."""
