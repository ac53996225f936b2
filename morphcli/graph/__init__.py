"""The working representation: a torch.fx GraphModule whose layer names are module paths."""
