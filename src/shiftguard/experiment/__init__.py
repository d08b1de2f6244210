"""The augmentation experiment: arms, their paired comparison, and the design's power."""
