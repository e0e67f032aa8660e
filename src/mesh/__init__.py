"""The image-analysis mesh: shared kit, services and generated protocol code."""
