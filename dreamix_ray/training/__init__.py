"""The one training loop (pretraining, finetuning, subject learning, Ray Train worker tasks): loop.py."""
