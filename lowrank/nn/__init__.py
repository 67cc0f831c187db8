"""Drop-in torch.nn modules."""
