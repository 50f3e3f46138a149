"""Encoder families behind one contract: tokens [batch, seq, d_model] in, tokens out (after a final norm).

The registry that maps a family name to its encoder class is `msm_lightning.model.families`.
"""
