"""Backbones, weight loading and heads."""
