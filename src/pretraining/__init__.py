"""The synthetic benchmark's backbone pretraining stages (vision, text), run before a random-init tiny model trains."""
