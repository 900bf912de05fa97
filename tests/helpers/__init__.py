"""Helpers the tests share: tiny data (`toy`) and a tiny Stable Diffusion pipeline (`sd_dummy`)."""
