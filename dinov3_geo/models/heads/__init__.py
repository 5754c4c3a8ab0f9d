"""Task heads on top of the backbone features."""
