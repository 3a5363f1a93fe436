"""pyramidflow."""
