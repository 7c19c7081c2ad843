"""Backbones and the transfer methods that adapt them."""
