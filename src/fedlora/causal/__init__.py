"""Causal-LM fine-tuning pieces: prompts and answer-only loss, generation and scoring, the shipped
SmolLM2 model and the merged export. Put together by `fedlora.tasks.causal`."""
