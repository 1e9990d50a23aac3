"""The grounding demo page (`python -m src.demo ckpt=PATH [ckpt_b=PATH]`, `make demo`): src.predict's checkpoints
on an image dropped in the browser. serve: the command; page: the Gradio layout; answer: one request;
examples: the pictures offered."""
