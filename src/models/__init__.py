"""Models: the grounder, its encoders, the fusion head and the PEFT methods."""
