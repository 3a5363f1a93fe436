"""Experiments built from the library's own calls: the paper's ablation table and the synthetic demo."""
