"""Pure loss functions, one per module, each citing its paper."""
