"""Inference: the sampler, editors and thinkers, and the think -> edit -> reflect loop."""
