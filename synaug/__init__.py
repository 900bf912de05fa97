"""synaug."""
