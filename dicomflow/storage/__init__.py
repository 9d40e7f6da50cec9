"""Blob stores: the original bytes of every instance, under opaque keys."""
