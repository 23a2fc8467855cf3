"""Encoders of UP2You's first stages: BiRefNet matting, DINOv2 features, the shape predictor and the
pose-conditioned feature aggregator (PCFA), plus the photo canonicalisation that feeds them.

Each model module loads the released checkpoint strictly (every key consumed, none missing), so a
renamed key fails loudly instead of running with random weights.
"""
