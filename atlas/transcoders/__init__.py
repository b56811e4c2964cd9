"""transcoders."""
