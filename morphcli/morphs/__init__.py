"""Function-preserving morphs: deepen, widen, swap."""
