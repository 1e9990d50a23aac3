"""A PETL experiment suite for Referring Expression Comprehension, built around MaPPER."""
