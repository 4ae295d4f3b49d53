"""What a pretrained student is for: linear probing, finetuning, evaluation, per-point features."""
