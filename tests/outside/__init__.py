"""Code that lives outside the package, as a user's own would (a dataset loader module)."""
