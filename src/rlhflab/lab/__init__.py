"""The gold-reward lab: built-in tasks with hidden gold rewards, simulated annotators, data making.

Training code may use `rlhflab.lab.tasks` (prompts, base models, demonstrations) and the datasets that
`rlhflab.lab.make_data` writes. The gold reward (`rlhflab.lab.gold`) is for the annotators and the
evaluator only.
"""
