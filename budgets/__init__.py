"""Measured memory tables and the small functions that turn a table and a Plan into bytes per stage."""
