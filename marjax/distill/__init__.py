"""Distillation: attention->SSM init, losses (chunked KL, features, matrix orientation), stages."""
