"""wsss package."""
