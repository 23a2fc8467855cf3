"""Geometry: the SMPL-X A-pose body, continuous remeshing, hands, Poisson and vertex colours."""
