"""Measurement that needs no lab: metrics (intervals, win rates, diversity, rank correlation) and reports.

Gold-judged evaluation of policies and reward models on a lab task is lab work: `rlhflab.lab.evaluate`.
"""
