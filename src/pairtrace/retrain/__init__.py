"""Retraining from M0: the DPO recipe, the retrainer protocol and its engines."""
